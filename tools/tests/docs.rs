//! The README and docs/ as a newcomer follows them: every link leads somewhere, and the
//! performance page's tables are what `bench/tables.py` prints from the committed results.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ is in the repository")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pages: the README and every Markdown file in docs/.
fn pages() -> Vec<PathBuf> {
    let root = repo_root();
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).expect("docs/") {
        let path = entry.expect("docs/ entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    pages
}

/// The targets of a page's Markdown links (`[text](target)`), outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            found.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    found
}

/// GitHub's anchor of a heading: lower case, spaces to dashes, punctuation dropped.
fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_link_in_the_readme_and_docs_leads_to_a_file_and_heading_that_exist() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = read(&page);
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().expect("a page is in a folder").join(file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            }
            if !anchor.is_empty() && !anchors(&read(&target)).iter().any(|a| a == anchor) {
                broken.push(format!("{}: {link}: no such heading", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_performance_pages_tables_are_what_bench_tables_py_prints() {
    let root = repo_root();
    let out = Command::new("python3")
        .current_dir(&root)
        .args([
            "bench/tables.py",
            "bench/results.json",
            "bench/profile.json",
            "bench/timeline.json",
        ])
        .output()
        .expect("python3 runs bench/tables.py");
    assert!(
        out.status.success(),
        "bench/tables.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("UTF-8 tables");
    let page = read(&root.join("docs/performance.md"));
    let tables: Vec<&str> = printed
        .split("\n\n")
        .filter(|t| !t.trim().is_empty())
        .collect();
    assert!(tables.len() >= 5, "tables.py printed:\n{printed}");
    for table in tables {
        assert!(
            page.contains(table.trim()),
            "docs/performance.md lacks this table from `python3 bench/tables.py \
             bench/results.json bench/profile.json bench/timeline.json` (paste it in):\n{table}"
        );
    }
}

#[test]
fn the_readme_stays_short() {
    let lines = read(&repo_root().join("README.md")).lines().count();
    assert!(
        lines <= 350,
        "README.md has {lines} lines: what goes past a newcomer's first read belongs in docs/"
    );
}

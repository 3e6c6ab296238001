//! The README and docs/ as a newcomer follows them: every link leads somewhere, every test the
//! guarantees cite exists, and the performance page's tables are what `bench/tables.py`
//! prints from the committed results.

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

/// Every function (and macro-made test) name in the workspace's own Rust sources.
fn function_names() -> std::collections::HashSet<String> {
    let mut names = std::collections::HashSet::new();
    let mut dirs: Vec<PathBuf> = [
        "core",
        "filter/src",
        "host-tests",
        "services",
        "tools",
        "tests",
    ]
    .iter()
    .map(|d| repo_root().join(d))
    .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = read(&path);
                // (Tests the suites' macros define are named as their first argument.)
                for opening in ["fn ", "on_every_gateway!(", "on_both_builds!("] {
                    for (at, _) in text.match_indices(opening) {
                        let name: String = text[at + opening.len()..]
                            .trim_start()
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        names.insert(name);
                    }
                }
            }
        }
    }
    names
}

#[test]
fn every_test_the_guarantees_cite_exists() {
    let names = function_names();
    let page = read(&repo_root().join("docs/guarantees.md"));
    let mut missing = Vec::new();
    for row in page.lines().filter(|l| l.starts_with('|')) {
        let shown_by = row
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .unwrap_or_default();
        for cited in shown_by.split('`').skip(1).step_by(2) {
            // A path (`module::name`) or a name in the module before (`..._name`); `*` and a
            // trailing `...` leave the rest of the name open; a module (`x::*`, `x::tests`)
            // or a test file (`x`) names no function.
            if !cited.contains("::") && !cited.starts_with("..") {
                continue;
            }
            let name = cited.rsplit("::").next().unwrap_or(cited);
            let name = name.trim_start_matches('.').trim_start_matches('_');
            let open = name.ends_with('*') || name.ends_with("...") || cited.starts_with("...");
            let name = name.trim_end_matches('*').trim_end_matches('.');
            if name.is_empty() || name == "tests" {
                continue;
            }
            let found = match open {
                true => names.iter().any(|n| n.contains(name)),
                false => names.contains(name),
            };
            if !found {
                missing.push(cited.to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "cited in docs/guarantees.md, defined nowhere: {missing:?}"
    );
}

//! `plan-limits validate`: the plans as a table, one column per plan.

use plan_limits_core::{FeatureAccess, Limit, Plan, Plans, Terms};

pub fn render(plans: &Plans) -> String {
    let columns = plans.plans();
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec![String::new()];
    header.extend(
        columns
            .iter()
            .map(|plan| format!("{} ({})", plan.name, plan.key)),
    );
    rows.push(header);
    for action in plans.actions() {
        let mut row = vec![format!("{} / month", action.key)];
        for plan in columns {
            row.push(terms_cell(action.terms(Some(&plan.key))));
        }
        rows.push(row);
    }
    let mut push = |name: &str, cell: &dyn Fn(&Plan) -> String| {
        let mut row = vec![name.to_string()];
        row.extend(columns.iter().map(|plan| cell(plan)));
        rows.push(row);
    };
    push("max file size", &|p| bytes(p.max_file_size_bytes));
    push("storage", &|p| bytes(p.storage_bytes));
    push("team members", &|p| count(p.team_members));
    push("features", &|p| p.features.len().to_string());
    push("upgrade to", &|p| {
        p.upgrade_path
            .first()
            .map(|step| step.key.clone())
            .unwrap_or_else(|| "-".into())
    });
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A plan's terms for an action: its monthly limit, or "off" without the action's feature.
pub fn terms_cell(terms: &Terms) -> String {
    match &terms.feature {
        FeatureAccess::Missing { feature, .. } => format!("off (needs {feature})"),
        FeatureAccess::Included => count(terms.limit),
    }
}

/// "5", "unlimited".
pub fn count(limit: Limit) -> String {
    limit
        .map(|n| n.to_string())
        .unwrap_or_else(|| "unlimited".into())
}

/// "10 MB", "1 GB" (1024-based), "unlimited".
pub fn bytes(limit: Limit) -> String {
    const MB: u64 = 1 << 20;
    const GB: u64 = 1 << 30;
    match limit {
        None => "unlimited".to_string(),
        Some(b) if b % GB == 0 => format!("{} GB", b / GB),
        Some(b) if b % MB == 0 => format!("{} MB", b / MB),
        Some(b) => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_action_and_limit() {
        let plans = Plans::from_json(plan_limits_services::plans_json().as_bytes()).unwrap();
        let table = render(&plans);
        let row = |start: &str| -> Vec<String> {
            table
                .lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_else(|| panic!("no row {start}:\n{table}"))
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(
            row("upload / month"),
            ["upload / month", "unlimited", "5", "unlimited"]
        );
        assert_eq!(
            row("api_call"),
            [
                "api_call / month",
                "10000",
                "off (needs api_access)",
                "off (needs api_access)"
            ]
        );
        assert_eq!(
            row("max file size"),
            ["max file size", "500 MB", "10 MB", "100 MB"]
        );
        assert_eq!(row("storage"), ["storage", "unlimited", "1 GB", "50 GB"]);
        assert_eq!(
            row("upgrade to"),
            ["upgrade to", "-", "professional", "enterprise"]
        );
    }
}

//! The usage page (`demo/usage.html`, served at `/usage`) in real headless Chromium against
//! real Envoy: what it shows is what the gateway counted, in the warning colours, with the
//! day's history; without a valid token it asks for one.

use plan_limits_services::browser;
use plan_limits_services::process::scratch_dir;
use plan_limits_tests::*;

/// The element of `dom` carrying `attribute` (its opening tag and text up to the next tag).
fn element<'a>(dom: &'a str, attribute: &str) -> &'a str {
    let at = dom
        .find(attribute)
        .unwrap_or_else(|| panic!("{attribute} not in the page:\n{dom}"));
    let start = dom[..at].rfind('<').unwrap_or(at);
    let end = dom[at..].find("</").map_or(dom.len(), |e| at + e);
    &dom[start..end]
}

fn text(element: &str) -> &str {
    element.rsplit('>').next().unwrap_or_default().trim()
}

#[test]
fn the_usage_page_shows_what_the_gateway_counted() {
    let gw = envoy();
    let port = gw.gateway_port;
    for _ in 0..3 {
        assert_eq!(upload("pat", "free").send(port).status, 200);
    }
    let named = upload("pat", "free").header("x-file-name", "pump room.pdf");
    assert_eq!(named.send(port).status, 200);
    let vision = analysis("pat", "free").header("x-analysis-kind", "vision");
    assert_eq!(vision.send(port).status, 200);
    assert!(counts(&gw, "pat", "upload", 4) && counts(&gw, "pat", "ai_analysis", 1));

    let dir = scratch_dir("usage-page");
    let url = format!(
        "http://127.0.0.1:{port}/usage#token={}",
        token("pat", "free")
    );
    let dom = browser::dom(&url, &dir.join("profile"));
    assert!(dom.contains(r#"data-loaded="true""#), "{dom}");
    assert_eq!(text(element(&dom, r#"data-testid="plan""#)), "Free");
    assert_eq!(
        text(element(&dom, r#"data-testid="upload-count""#)),
        "4 of 5 diagrams"
    );
    assert_eq!(
        text(element(&dom, r#"data-testid="upload-remaining""#)),
        "1 left"
    );
    assert_eq!(
        text(element(&dom, r#"data-testid="ai_analysis-count""#)),
        "1 of 3 AI analyses"
    );
    // 80 %: the warning colour; 33 %: none.
    assert!(element(&dom, r#"data-action="upload""#).contains("meter warn"));
    // The last uses with their metadata, newest first: the analysis, then the named upload.
    let newest = text(element(&dom, r#"data-testid="recent-0""#));
    assert!(newest.starts_with("AI analysis · vision"), "{newest}");
    let named = text(element(&dom, r#"data-testid="recent-1""#));
    assert!(
        named.starts_with("Upload · ") && named.contains("file name: pump room.pdf"),
        "{named}"
    );
    // AI analyses by kind, from the history.
    assert_eq!(
        text(element(&dom, r#"data-testid="ai_analysis-kind-vision""#)),
        "vision 1"
    );
    assert!(!element(&dom, r#"data-action="ai_analysis""#).contains("warn"));
    assert_eq!(
        text(element(&dom, r#"data-testid="dxf_export-count""#)),
        "Not in your plan"
    );
    // The running totals: the four 10-byte diagrams, the subscriber's team of one.
    assert_eq!(
        text(element(&dom, r#"data-testid="storage-count""#)),
        "0.0 of 1024 MB"
    );
    assert_eq!(
        text(element(&dom, r#"data-testid="team-count""#)),
        "1 of 1 member"
    );
    // Today's bar holds the five.
    let today = gw.now().date_naive();
    assert!(
        dom.contains(&format!(r#"data-date="{today}" data-total="5""#)),
        "{dom}"
    );

    // A screenshot of it (docs/using.md's is one of these).
    let png = dir.join("usage-page.png");
    browser::screenshot(&url, &dir.join("profile-2"), &png);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000);

    // Its Upgrade button is a link to the product's upgrade page (plans.json's upgrade_url),
    // with the plan offered; the page it leads to, loaded as the click would, has it.
    let upgrade = element(&dom, r#"data-testid="upgrade-button""#);
    assert!(upgrade.starts_with("<a "), "{upgrade}");
    assert!(
        upgrade.contains(r#"href="/pricing?plan=professional""#),
        "{upgrade}"
    );
    let pricing = format!("http://127.0.0.1:{port}/pricing?plan=professional");
    let page = browser::dom(&pricing, &dir.join("profile-4"));
    assert_eq!(
        text(element(&page, r#"data-testid="chosen""#)),
        "professional",
        "{page}"
    );

    // A token the gateway does not accept: the page says so and asks for one.
    let bad = format!("http://127.0.0.1:{port}/usage#token=not-a-token");
    let dom = browser::dom(&bad, &dir.join("profile-3"));
    assert!(dom.contains(r#"data-loaded="error""#), "{dom}");
    assert!(text(element(&dom, r#"data-testid="error""#)).contains("valid bearer token"));
}

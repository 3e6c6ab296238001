//! The filter packed as an OCI image (`plan-limits oci`, `make oci`): the layout unpacks,
//! every digest and size checked, to the very `.wasm` built, which real Envoy then runs;
//! skopeo reads the layout and carries it through a registry on loopback and back unchanged.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use plan_limits_services::gateway::{EnvoyGateway, GatewayOptions};
use plan_limits_services::http::{Body, Request};
use plan_limits_services::process::{free_port, scratch_dir, Service};
use plan_limits_tools::oci;

fn run(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pack(wasm: &Path, layout: &Path, tag: &str) -> String {
    let digest = run(Command::new(env!("CARGO_BIN_EXE_plan-limits"))
        .arg("oci")
        .arg(wasm)
        .arg("--out")
        .arg(layout)
        .args(["--tag", tag]));
    digest.trim().to_string()
}

#[test]
fn the_image_unpacks_to_the_built_module_and_envoy_runs_it() {
    let wasm = plan_limits_services::filter_wasm();
    let dir = scratch_dir("oci-envoy");
    let layout = dir.join("plan-limits-filter");
    let digest = pack(&wasm, &layout, "test");
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    // index.json -> manifest -> config and layer, each blob's sha256 and size checked.
    let unpacked = oci::read_layout(&layout, Some("test")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        unpacked == std::fs::read(&wasm).unwrap(),
        "plugin.wasm is the built module"
    );
    let module = dir.join("plugin.wasm");
    std::fs::write(&module, &unpacked).unwrap();

    // Envoy loads the unpacked module and meters with it.
    let gw = EnvoyGateway::start(GatewayOptions {
        wasm: Some(module),
        ..GatewayOptions::default()
    });
    let response = Request::new("POST", "/api/upload")
        .user("olga", "free")
        .body(Body::Bytes(b"<diagram/>".to_vec()))
        .send(gw.gateway_port);
    assert_eq!(response.status, 200, "{}", response.body_text());
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.envoy_stat("wasmcustom.plan_limits.counted") < 1 {
        assert!(Instant::now() < deadline, "the upload was never counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And refuses with it: a user without a token, on a metered route.
    let anonymous = Request::new("POST", "/api/upload")
        .body(Body::Bytes(b"<diagram/>".to_vec()))
        .send(gw.gateway_port);
    assert_eq!(anonymous.status, 401);
}

fn tool(name: &str) -> &str {
    assert!(
        Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .is_ok_and(|o| o.status.success()),
        "{name} is missing: `make deps-test` installs it"
    );
    name
}

#[test]
fn skopeo_reads_the_layout_and_a_registry_round_trip_keeps_every_byte() {
    let (skopeo, registry) = (tool("skopeo"), tool("docker-registry"));
    let wasm = plan_limits_services::filter_wasm();
    let dir = scratch_dir("oci-registry");
    let layout = dir.join("plan-limits-filter");
    let digest = pack(&wasm, &layout, "0.1.0");
    let skopeo = || {
        let mut command = Command::new(skopeo);
        // No signature policy to consult: the images are the test's own.
        command.arg("--insecure-policy");
        command
    };

    // skopeo reads the layout as an image: the manifest is ours, byte for byte.
    let source = format!("oci:{}:0.1.0", layout.display());
    let raw = run(skopeo().args(["inspect", "--raw", &source]));
    assert_eq!(oci::digest(raw.as_bytes()), digest);
    let config: serde_json::Value =
        serde_json::from_str(&run(skopeo().args(["inspect", "--config", &source]))).unwrap();
    assert_eq!(
        (&config["architecture"], &config["os"]),
        (&"wasm".into(), &"wasip1".into())
    );

    // Pushed to a registry on loopback and pulled back into another layout, unchanged.
    let port = free_port();
    let config_file = dir.join("registry.yml");
    std::fs::write(
        &config_file,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let mut command = Command::new(registry);
    command.arg("serve").arg(&config_file);
    let mut service = Service::spawn("docker-registry", command, &dir.join("registry.log"));
    service.wait_for_port(port, Duration::from_secs(20));
    let remote = format!("docker://127.0.0.1:{port}/plan-limits-filter:0.1.0");
    run(skopeo().args(["copy", "--dest-tls-verify=false", &source, &remote]));
    let inspected: serde_json::Value = serde_json::from_str(&run(skopeo().args([
        "inspect",
        "--tls-verify=false",
        &remote,
    ])))
    .unwrap();
    assert_eq!(
        inspected["Digest"],
        digest.as_str(),
        "the registry names it by our digest"
    );
    let pulled = dir.join("pulled");
    let target = format!("oci:{}:0.1.0", pulled.display());
    run(skopeo().args(["copy", "--src-tls-verify=false", &remote, &target]));
    let unpacked = oci::read_layout(&pulled, Some("0.1.0")).unwrap_or_else(|e| panic!("{e}"));
    assert!(unpacked == std::fs::read(&wasm).unwrap());
}

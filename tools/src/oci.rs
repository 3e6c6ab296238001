//! `plan-limits oci`: the filter `.wasm` packed as an OCI image, in an OCI image layout
//! directory (`oci-layout`, `index.json`, `blobs/sha256/<digest>`), the form Istio's and
//! Envoy Gateway's image fetchers pull once it is pushed to a registry (`skopeo copy
//! oci:DIR:TAG docker://REGISTRY/REPO:TAG`).
//!
//! The image is the *compat* variant of the Wasm image specification (solo-io/wasm,
//! spec/spec-compat.md), the one plain container tooling also handles:
//!
//! ```text
//! index.json   application/vnd.oci.image.index.v1+json      one manifest, tagged by
//!                                                           org.opencontainers.image.ref.name
//! manifest     application/vnd.oci.image.manifest.v1+json   annotation module.wasm.image/variant=compat
//! config       application/vnd.oci.image.config.v1+json     architecture wasm, os wasip1
//! layer        application/vnd.oci.image.layer.v1.tar+gzip  exactly one: a tar holding plugin.wasm
//! ```
//!
//! Istio (pkg/wasm/imagefetcher.go) takes the image's last layer; with this media type it
//! gunzips and untars it and loads the entry whose base name is `plugin.wasm`. (Its other
//! accepted forms are a Docker image, `application/vnd.docker.image.rootfs.diff.tar.gzip`,
//! and the *oci* variant, a raw `application/vnd.module.wasm.content.layer.v1+wasm` layer
//! with an `application/vnd.module.wasm.config.v1+json` config.) Envoy Gateway's fetcher is
//! derived from Istio's.
//!
//! Every byte is a function of the module: the tar entry has no time or owner and gzip no
//! time, so packing the same `.wasm` twice gives the same digests.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The manifest annotation the compat variant requires with an OCI layer media type.
pub const VARIANT_ANNOTATION: (&str, &str) = ("module.wasm.image/variant", "compat");
/// The index annotation that names a manifest's tag in an image layout.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The file in the layer the fetchers load.
pub const WASM_FILE: &str = "plugin.wasm";

/// What `write_layout` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packed {
    /// `sha256:<hex>` of the manifest: what a registry names the image by
    /// (`REPO@sha256:...`, the pin for `--image`).
    pub manifest_digest: String,
    pub tag: String,
    pub dir: PathBuf,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

/// The layer: a gzipped tar whose one entry is `plugin.wasm`, and the tar itself (whose
/// digest is the config's `diff_id`).
fn layer(wasm: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    tar.append_data(&mut header, WASM_FILE, wasm)
        .map_err(|e| format!("tar: {e}"))?;
    let tar = tar.into_inner().map_err(|e| format!("tar: {e}"))?;
    // No file name and time 0 in the gzip header: the same module, the same bytes.
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    gz.write_all(&tar).map_err(|e| format!("gzip: {e}"))?;
    let gz = gz.finish().map_err(|e| format!("gzip: {e}"))?;
    Ok((gz, tar))
}

/// Writes the OCI image layout of `wasm` into `dir` (created; an existing layout there is
/// replaced), its manifest tagged `tag`.
pub fn write_layout(wasm: &[u8], dir: &Path, tag: &str) -> Result<Packed, String> {
    if !wasm.starts_with(b"\0asm") {
        return Err("not a WebAssembly module (no \\0asm header)".into());
    }
    let (layer, tar) = layer(wasm)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
    }))
    .map_err(|e| e.to_string())?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": descriptor(CONFIG_MEDIA_TYPE, &config),
        "layers": [descriptor(LAYER_MEDIA_TYPE, &layer)],
        "annotations": {VARIANT_ANNOTATION.0: VARIANT_ANNOTATION.1},
    }))
    .map_err(|e| e.to_string())?;
    let mut manifest_descriptor = descriptor(MANIFEST_MEDIA_TYPE, &manifest);
    manifest_descriptor["annotations"] = serde_json::json!({REF_NAME_ANNOTATION: tag});
    let index = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": [manifest_descriptor],
    }))
    .map_err(|e| e.to_string())?;

    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("{}: {e}", blobs.display()))?;
    for blob in [&layer, &config, &manifest] {
        let hex = digest(blob);
        let path = blobs.join(hex.trim_start_matches("sha256:"));
        std::fs::write(&path, blob).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    write("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    write("index.json", &index)?;
    Ok(Packed {
        manifest_digest: digest(&manifest),
        tag: tag.to_string(),
        dir: dir.to_path_buf(),
    })
}

/// The blob a descriptor names, checked against its digest and size.
fn blob(dir: &Path, descriptor: &serde_json::Value, what: &str) -> Result<Vec<u8>, String> {
    let named = descriptor["digest"]
        .as_str()
        .ok_or_else(|| format!("{what}: no digest"))?;
    let hex = named
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| format!("{what}: {named} is not a sha256 digest"))?;
    let path = dir.join("blobs/sha256").join(hex);
    let bytes = std::fs::read(&path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    if digest(&bytes) != named {
        return Err(format!(
            "{what}: {} does not hash to its name",
            path.display()
        ));
    }
    let size = descriptor["size"].as_u64();
    if size != Some(bytes.len() as u64) {
        return Err(format!(
            "{what}: {} bytes, the descriptor says {size:?}",
            bytes.len()
        ));
    }
    Ok(bytes)
}

fn json(bytes: &[u8], what: &str) -> Result<serde_json::Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("{what}: {e}"))
}

/// Reads the module back out of the OCI image layout in `dir` as a fetcher would: the
/// manifest tagged `tag` (the only one when `None`), its config and its one layer, every
/// blob checked against its digest and size, the media types and the compat annotation
/// checked, and `plugin.wasm` taken from the layer.
pub fn read_layout(dir: &Path, tag: Option<&str>) -> Result<Vec<u8>, String> {
    let layout = std::fs::read(dir.join("oci-layout"))
        .map_err(|e| format!("{}: {e}", dir.join("oci-layout").display()))?;
    if json(&layout, "oci-layout")?["imageLayoutVersion"] != "1.0.0" {
        return Err("oci-layout: not imageLayoutVersion 1.0.0".into());
    }
    let index = std::fs::read(dir.join("index.json"))
        .map_err(|e| format!("{}: {e}", dir.join("index.json").display()))?;
    let index = json(&index, "index.json")?;
    let manifests = index["manifests"]
        .as_array()
        .ok_or("index.json: no manifests")?;
    let chosen: Vec<&serde_json::Value> = manifests
        .iter()
        .filter(|m| tag.is_none_or(|t| m["annotations"][REF_NAME_ANNOTATION] == t))
        .collect();
    let [manifest_descriptor] = chosen[..] else {
        return Err(format!(
            "index.json: {} manifests {}",
            chosen.len(),
            tag.map_or("(one expected)".into(), |t| format!("tagged {t}"))
        ));
    };
    expect_media_type(
        manifest_descriptor,
        MANIFEST_MEDIA_TYPE,
        "index.json manifest",
    )?;
    let manifest = json(&blob(dir, manifest_descriptor, "manifest")?, "manifest")?;
    expect_media_type(&manifest, MANIFEST_MEDIA_TYPE, "manifest")?;
    if manifest["annotations"][VARIANT_ANNOTATION.0] != VARIANT_ANNOTATION.1 {
        return Err(format!(
            "manifest: no {}={} annotation",
            VARIANT_ANNOTATION.0, VARIANT_ANNOTATION.1
        ));
    }
    expect_media_type(&manifest["config"], CONFIG_MEDIA_TYPE, "config")?;
    let config = json(&blob(dir, &manifest["config"], "config")?, "config")?;
    let layers = manifest["layers"].as_array().ok_or("manifest: no layers")?;
    let [layer_descriptor] = &layers[..] else {
        return Err(format!(
            "manifest: {} layers, the compat variant has one",
            layers.len()
        ));
    };
    expect_media_type(layer_descriptor, LAYER_MEDIA_TYPE, "layer")?;
    let layer = blob(dir, layer_descriptor, "layer")?;
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(&layer[..])
        .read_to_end(&mut tar)
        .map_err(|e| format!("layer: gzip: {e}"))?;
    if config["rootfs"]["diff_ids"] != serde_json::json!([digest(&tar)]) {
        return Err("config: rootfs.diff_ids is not the layer's uncompressed digest".into());
    }
    let mut archive = tar::Archive::new(&tar[..]);
    for entry in archive.entries().map_err(|e| format!("layer: tar: {e}"))? {
        let mut entry = entry.map_err(|e| format!("layer: tar: {e}"))?;
        let path = entry.path().map_err(|e| format!("layer: tar: {e}"))?;
        if path.file_name().is_some_and(|n| n == WASM_FILE) {
            let mut wasm = Vec::new();
            entry
                .read_to_end(&mut wasm)
                .map_err(|e| format!("layer: {WASM_FILE}: {e}"))?;
            return Ok(wasm);
        }
    }
    Err(format!("layer: no {WASM_FILE}"))
}

fn expect_media_type(value: &serde_json::Value, expected: &str, what: &str) -> Result<(), String> {
    match value["mediaType"].as_str() {
        Some(media_type) if media_type == expected => Ok(()),
        other => Err(format!("{what}: media type {other:?}, expected {expected}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULE: &[u8] = b"\0asm\x01\0\0\0";

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("plan-limits-oci-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_packed_module_reads_back_and_packing_it_again_gives_the_same_digest() {
        let dir = scratch("round-trip");
        let packed = write_layout(MODULE, &dir, "0.1.0").unwrap();
        assert_eq!(read_layout(&dir, Some("0.1.0")).unwrap(), MODULE);
        assert_eq!(read_layout(&dir, None).unwrap(), MODULE);
        assert!(read_layout(&dir, Some("other")).is_err());
        let again = write_layout(MODULE, &dir, "0.1.0").unwrap();
        assert_eq!(packed.manifest_digest, again.manifest_digest);
        // Three blobs: manifest, config, layer.
        assert_eq!(
            std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count(),
            3
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_manifest_is_the_compat_variant() {
        let dir = scratch("manifest");
        let packed = write_layout(MODULE, &dir, "t").unwrap();
        let hex = packed.manifest_digest.trim_start_matches("sha256:");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap())
                .unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(manifest["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(
            manifest["annotations"]["module.wasm.image/variant"],
            "compat"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_blob_that_does_not_match_its_digest_or_size_is_refused() {
        let dir = scratch("tampered");
        write_layout(MODULE, &dir, "t").unwrap();
        // Change one byte of the layer: its digest no longer names it.
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let manifest_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("blobs/sha256").join(&manifest_hex)).unwrap(),
        )
        .unwrap();
        let layer = dir
            .join("blobs/sha256")
            .join(&manifest["layers"][0]["digest"].as_str().unwrap()[7..]);
        let mut bytes = std::fs::read(&layer).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&layer, &bytes).unwrap();
        let err = read_layout(&dir, None).unwrap_err();
        assert!(err.contains("does not hash to its name"), "{err}");
        // A size that lies is refused too.
        write_layout(MODULE, &dir, "t").unwrap();
        let mut index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["size"] = 1.into();
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        let err = read_layout(&dir, None).unwrap_err();
        assert!(err.contains("the descriptor says"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_webassembly_module_is_packed() {
        let err = write_layout(b"#!/bin/sh", &scratch("not-wasm"), "t").unwrap_err();
        assert!(err.contains("not a WebAssembly module"), "{err}");
    }
}

//! The committed schema files and samples agree with the Rust types.
//!
//! Regenerate after adding a type or version: `ORDERLY_UPDATE_SCHEMAS=1 cargo test -p
//! orderly-event-schemas`. That writes missing schema files only; a published file that no longer
//! matches its type fails even then, because changing a published version is forbidden.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use orderly_event_schemas::{StoredMetadata, decode, decode_recorded, registry};
use serde_json::Value;

const METADATA_STEM: &str = "metadata";

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn pretty(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).expect("schemas serialize") + "\n"
}

/// Every schema this build publishes, by file stem.
fn generated_schemas() -> Vec<(String, String)> {
    let mut schemas: Vec<(String, String)> = registry()
        .iter()
        .map(|registration| {
            (
                registration.file_stem(),
                pretty(&registration.json_schema()),
            )
        })
        .collect();
    schemas.push((
        METADATA_STEM.to_owned(),
        pretty(&schemars::schema_for!(StoredMetadata)),
    ));
    schemas
}

fn json_files(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .expect("directory exists")
        .map(|entry| {
            entry
                .expect("readable entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter_map(|name| name.strip_suffix(".json").map(str::to_owned))
        .collect()
}

fn read_json(path: &Path) -> Value {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn schema_errors(schema: &schemars::Schema, document: &Value) -> Vec<String> {
    let schema = serde_json::to_value(schema).expect("schema is JSON");
    let validator = jsonschema::validator_for(&schema).expect("schema compiles");
    validator
        .iter_errors(document)
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn committed_schema_files_match_the_types() {
    let update = std::env::var_os("ORDERLY_UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let mut problems = Vec::new();
    for (stem, schema) in generated_schemas() {
        let path = dir("schemas").join(format!("{stem}.json"));
        match fs::read_to_string(&path) {
            Ok(committed) if committed == schema => {}
            Ok(_) => problems.push(format!(
                "{stem}: the type no longer matches its published schema. Published versions never \
                 change: restore the type and add a new version with an upcaster instead"
            )),
            Err(_) if update => fs::write(&path, schema).expect("schemas/ is writable"),
            Err(_) => problems.push(format!(
                "{stem}: no schema file; run ORDERLY_UPDATE_SCHEMAS=1 cargo test -p orderly-event-schemas"
            )),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Files in `folder` whose stem is no registered (type, version).
fn unregistered_files(folder: &str) -> Vec<String> {
    let registered: BTreeSet<String> = generated_schemas()
        .into_iter()
        .map(|(stem, _)| stem)
        .collect();
    json_files(&dir(folder))
        .difference(&registered)
        .cloned()
        .collect()
}

#[test]
fn every_schema_file_belongs_to_a_registered_version() {
    let orphans = unregistered_files("schemas");
    assert!(
        orphans.is_empty(),
        "schema files without a registered type: {orphans:?}. Old versions must stay readable: \
         keep their type and upcaster in the registry"
    );
}

#[test]
fn every_version_has_a_sample_that_decodes_and_fits_its_schema() {
    for registration in registry() {
        let stem = registration.file_stem();
        let sample = read_json(&dir("samples").join(format!("{stem}.json")));
        let errors = schema_errors(&registration.json_schema(), &sample);
        assert!(
            errors.is_empty(),
            "{stem} sample breaks its schema: {errors:?}"
        );
        let event = decode(
            registration.event_type,
            registration.schema_version,
            sample.clone(),
        )
        .unwrap_or_else(|e| panic!("{stem} sample does not decode: {e}"));
        assert_eq!(event.event_type(), registration.event_type);
        if registration.current {
            // Current samples are canonical: decoding then encoding gives the same document.
            assert_eq!(
                event.to_data().expect("encodes"),
                sample,
                "{stem} round trip"
            );
        }
    }
}

#[test]
fn every_sample_belongs_to_a_registered_version() {
    let orphans = unregistered_files("samples");
    assert!(
        orphans.is_empty(),
        "samples without a registered version: {orphans:?}"
    );
}

#[test]
fn the_metadata_sample_fits_its_schema_and_carries_the_schema_version() {
    let sample = read_json(&dir("samples").join(format!("{METADATA_STEM}.json")));
    let errors = schema_errors(&schemars::schema_for!(StoredMetadata), &sample);
    assert!(
        errors.is_empty(),
        "metadata sample breaks its schema: {errors:?}"
    );
    let data = read_json(&dir("samples").join("OrderDelivered.v1.json"));
    let recorded = decode_recorded("OrderDelivered", data, sample).expect("decodes");
    assert_eq!(recorded.stored_schema_version, 1);
}

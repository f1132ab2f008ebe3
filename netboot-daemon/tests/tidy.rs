//! Repository consistency: versions, docs that must name every crate and variable.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

#[test]
fn version_file_equals_the_workspace_version() {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml parses");
    let version = manifest["workspace"]["package"]["version"]
        .as_str()
        .expect("workspace.package.version");
    assert_eq!(
        read("VERSION").trim(),
        version,
        "VERSION must equal workspace.package.version"
    );
    assert_eq!(netboot_daemon::api::VERSION, version);
}

#[test]
fn architecture_mentions_every_crate() {
    let arch = read("docs/ARCHITECTURE.md");
    for krate in [
        "netboot-common",
        "netboot-ebpf",
        "netboot-daemon",
        "xtask",
        "bench",
    ] {
        assert!(
            arch.contains(&format!("`{krate}`")),
            "docs/ARCHITECTURE.md does not mention `{krate}`"
        );
    }
}

#[test]
fn readme_documents_every_environment_variable() {
    let readme = read("README.md");
    for var in netboot_daemon::config::ENV_VARS {
        for name in std::iter::once(&var.name).chain(var.aliases) {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not document `{name}`"
            );
        }
    }
}

#[test]
fn every_variable_the_readme_documents_is_read() {
    let readme = read("README.md");
    for row in readme.lines().filter(|l| l.starts_with("| `NETBOOT_")) {
        let name = row.split('`').nth(1).expect("a variable name");
        assert!(
            netboot_daemon::config::ENV_VARS
                .iter()
                .any(|v| v.name == name),
            "README.md documents `{name}`, but config::ENV_VARS does not list it"
        );
    }
}

#[test]
fn readme_opens_with_the_two_commands_that_ci_uses() {
    let readme = read("README.md");
    let head: String = readme.lines().take(12).collect::<Vec<_>>().join("\n");
    assert!(
        head.contains("cargo xtask run") && head.contains("cargo xtask test"),
        "README must open with both commands"
    );
    assert!(
        read(".ci/run").contains("cargo xtask test"),
        ".ci/run must call the README's test command"
    );
}

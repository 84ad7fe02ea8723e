//! The Dockerfile's structure, checked without a container engine: a
//! cached multi-stage build with --locked, a non-root runtime, the data dir
//! as a volume, all three ports exposed, and a health check.

fn dockerfile() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).expect("Dockerfile")
}

/// The instructions (first word upper-case), continuation lines joined.
fn instructions() -> Vec<(String, String)> {
    let text = dockerfile().replace("\\\n", " ");
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(' ').map(|(i, rest)| (i.to_uppercase(), rest.trim().to_string())))
        .collect()
}

fn all(instruction: &str) -> Vec<String> {
    instructions().into_iter().filter(|(i, _)| i == instruction).map(|(_, rest)| rest).collect()
}

#[test]
fn multi_stage_with_a_cached_dependency_layer_and_a_locked_build() {
    let stages = all("FROM");
    assert!(stages.len() >= 2, "{stages:?}");
    assert!(stages[0].contains(" AS build"), "the first stage builds: {stages:?}");
    let runs = all("RUN");
    let builds: Vec<&String> = runs.iter().filter(|r| r.contains("cargo build")).collect();
    assert!(builds.len() >= 2, "dependencies are built in their own layer first: {runs:?}");
    assert!(builds.iter().all(|r| r.contains("--release") && r.contains("--locked")), "{builds:?}");
    let copies = all("COPY");
    let manifest = copies.iter().position(|c| c.contains("Cargo.lock")).expect("Cargo.lock copied");
    let sources = copies.iter().position(|c| c.starts_with("src ")).expect("sources copied");
    assert!(manifest < sources, "manifests before sources, so the dependency layer stays cached");
    assert!(copies.iter().any(|c| c.contains("--from=build")), "the runtime copies only the binary");
}

#[test]
fn the_runtime_is_non_root_with_a_volume_ports_and_a_health_check() {
    let user = all("USER");
    let user = user.last().expect("a USER");
    assert!(user != "root" && user != "0", "runs as root");
    assert!(all("VOLUME").iter().any(|v| v.contains("/var/lib/ordertrail")));
    let exposed: Vec<String> =
        all("EXPOSE").iter().flat_map(|e| e.split_whitespace().map(String::from).collect::<Vec<_>>()).collect();
    for port in ["8080", "50051", "9090"] {
        assert!(exposed.iter().any(|p| p == port), "port {port} not exposed: {exposed:?}");
    }
    assert!(all("HEALTHCHECK").iter().any(|h| h.contains("/readyz")));
    let env = all("ENV").join(" ");
    assert!(env.contains("ORDERTRAIL_DATA_DIR=/var/lib/ordertrail"), "{env}");
}

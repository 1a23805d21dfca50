//! `pdgate serve --config FILE --check` as a deployment runs it: the real binary, real files.
//! A good config exits 0 and prints what the gateway would run (secrets redacted, and the print
//! is itself a config that checks); each kind of problem exits non-zero naming it. And `serve`
//! checks discovery settings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pdgate-check-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// `pdgate serve --config FILE --check` with no `PDGATE_*` config in its environment.
fn check(file: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pdgate"));
    cmd.args(["serve", "--config"]).arg(file).arg("--check");
    for (k, _) in std::env::vars() {
        if k.starts_with("PDGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("runs pdgate")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config for a gateway bound off loopback, as in a pod: admin token, API keys from a file,
/// the fleet secret from a file, one SGLang pair.
fn good(d: &Path) -> String {
    let keys = write(d, "api-keys", "# clients\nsk-alpha\nsk-beta\n");
    let secret = write(d, "fleet-secret", "fleet-secret-0123456789abcdef\n");
    format!(
        r#"
[server]
host = "0.0.0.0"
port = 8080
admin_token = "admin-t0ken-value"
api_keys_file = "{}"
fleet_secret_file = "{}"
drain_secs = 20

[[workers]]
url = "http://10.1.0.7:30000"
role = "prefill"
protocol = "sglang"
bootstrap_port = 8998

[[workers]]
url = "http://decode-0.pd.svc.cluster.local:30000"
role = "decode"
protocol = "sglang"
"#,
        keys.display(),
        secret.display()
    )
}

#[test]
fn a_good_config_passes_and_prints_the_effective_config_redacted() {
    let d = dir("good");
    let file = write(&d, "gw.toml", &good(&d));
    let out = check(&file);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let v: toml::Table = printed.parse().expect("the print is TOML");
    assert_eq!(v["server"]["port"].as_integer(), Some(8080), "file value");
    assert_eq!(
        v["server"]["max_body_bytes"].as_integer(),
        Some(4 * 1024 * 1024),
        "defaults filled in"
    );
    assert_eq!(v["server"]["admin_token"].as_str(), Some("<redacted>"));
    assert!(!printed.contains("admin-t0ken-value"), "{printed}");
    assert_eq!(v["discovery"]["kind"].as_str(), Some("static"));
    assert_eq!(v["workers"].as_array().map(Vec::len), Some(2));
    assert!(v.get("up").is_none(), "serve does not read [up]");
    // What it printed is a config `--check` takes as it is.
    let again = write(&d, "printed.toml", &printed);
    let out = check(&again);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_unknown_key_is_named() {
    let d = dir("unknown");
    let text = good(&d).replace("drain_secs = 20", "drain_sec = 20");
    let out = check(&write(&d, "gw.toml", &text));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("unknown field `drain_sec`") && err.contains("gw.toml"),
        "{err}"
    );
}

#[test]
fn a_worker_url_without_a_port_or_with_another_scheme_is_named() {
    let d = dir("url");
    let text = good(&d)
        .replace("http://10.1.0.7:30000", "http://10.1.0.7")
        .replace(
            "http://decode-0.pd.svc.cluster.local:30000",
            "grpc://decode-0:30000",
        );
    let out = check(&write(&d, "gw.toml", &text));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(r#"workers[0].url "http://10.1.0.7": no port"#),
        "{err}"
    );
    assert!(
        err.contains(r#"workers[1].url "grpc://decode-0:30000""#),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let d = dir("missing");
    for (key, from, to) in [
        (
            "server.fleet_secret_file",
            "fleet-secret\"",
            "no-such-secret\"",
        ),
        ("server.api_keys_file", "api-keys\"", "no-such-keys\""),
    ] {
        let text = good(&d).replace(from, to);
        let out = check(&write(&d, "gw.toml", &text));
        assert!(!out.status.success(), "{key}");
        let err = stderr(&out);
        assert!(
            err.contains(key) && err.contains(&to[..to.len() - 1]),
            "{err}"
        );
    }
    let text = format!(
        "[model]\ntokenizer = \"/no/such/tokenizer.json\"\n{}",
        good(&d)
    );
    let out = check(&write(&d, "gw.toml", &text));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("model.tokenizer /no/such/tokenizer.json"),
        "{err}"
    );
}

#[test]
fn kubernetes_discovery_needs_its_selectors() {
    let d = dir("k8s");
    let file = write(
        &d,
        "gw.toml",
        r#"
[discovery]
kind = "kubernetes"

[discovery.kubernetes]
prefill_selector = ""
decode_selector = "pdgate.io/role=decode,pdgate.io/model=llama"
"#,
    );
    let out = check(&file);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("discovery.kubernetes.prefill_selector") && !err.contains("decode_selector"),
        "{err}"
    );

    // With both selectors the config is valid.
    let file = write(
        &d,
        "gw.toml",
        "[discovery]\nkind = \"kubernetes\"\n[discovery.kubernetes]\nnamespace = \"llm\"\n",
    );
    let out = check(&file);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// The two-model example checks, and its effective config (printed) checks again and still
/// lists both models with their engines and the one scheduler of their own.
#[test]
fn the_two_model_example_passes_and_prints_every_model() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/two-models.toml");
    let out = check(&example);
    assert!(out.status.success(), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let effective: toml::Value = toml::from_str(&printed).expect("the print is TOML");
    let models = effective["models"].as_array().expect("models");
    let names: Vec<_> = models.iter().map(|m| m["name"].as_str()).collect();
    assert_eq!(names, [Some("pdgate-sim-8b"), Some("pdgate-sim-70b")]);
    assert_eq!(models[0]["workers"].as_array().map(Vec::len), Some(2));
    assert!(models[0].get("scheduler").is_none());
    assert_eq!(models[1]["scheduler"]["policy"].as_str(), Some("slo"));
    let again = write(&dir("two-models"), "printed.toml", &printed);
    assert!(check(&again).status.success(), "{printed}");
}

/// Models that cannot be told apart, or share an engine, or have no engines: each named.
#[test]
fn clashing_or_empty_models_are_named() {
    let d = dir("models-bad");
    let file = write(
        &d,
        "gw.toml",
        r#"
[[models]]
name = "llama"
aliases = ["small"]
[[models.workers]]
url = "http://127.0.0.1:8101"
role = "decode"

[[models]]
name = "small"
[[models.workers]]
url = "http://127.0.0.1:8101/"
role = "prefill"

[[models]]
name = "empty"
"#,
    );
    let out = check(&file);
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in [
        "models[1] (small): `small` already names model `llama`",
        "engine http://127.0.0.1:8101 is already an engine of model `llama`",
        "models[2].no [[models.workers]]",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    // The single-model sections cannot be mixed in.
    let file = write(
        &d,
        "gw.toml",
        "[[workers]]\nurl = \"http://127.0.0.1:8101\"\nrole = \"decode\"\n[[models]]\nname = \"m\"\n[[models.workers]]\nurl = \"http://127.0.0.1:8102\"\nrole = \"decode\"\n",
    );
    let err = stderr(&check(&file));
    assert!(err.contains("[[models.workers]]"), "{err}");
}

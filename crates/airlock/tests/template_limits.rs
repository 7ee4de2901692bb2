//! Templates at the size cap, through the real control plane and appliance: both stay
//! responsive while templates at every cap are pushed, listed, requested and run; over a cap,
//! or costly to compile, a template is refused fast with `limit_exceeded` (422).
// Test helpers panic to report failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use airlock_core::pattern::MAX_PATTERN_BYTES;
use airlock_core::template::{MAX_MANIFEST_BYTES, MAX_SCRIPT_BYTES, MAX_VARIABLES};
use airlock_testkit::e2e::{Deployment, ok};

const BIN: &str = env!("CARGO_BIN_EXE_airlock");

const POLICY: &str = r#"
version = 1
serial = 1
phases = ["observe", "deploy", "operate"]
"#;

/// A pattern of exactly [`MAX_PATTERN_BYTES`]: 32 classes of 8 bytes, one character each.
fn pattern_at_cap() -> String {
    let p = "[a-z0-9]".repeat(MAX_PATTERN_BYTES / 8);
    assert_eq!(p.len(), MAX_PATTERN_BYTES);
    p
}

/// A value matching [`pattern_at_cap`].
fn value_at_cap(i: usize) -> String {
    format!("{i:0>32}")
}

/// `template.toml` with `variables` variables of `pattern`, padded to exactly `bytes` when
/// given; and a script of exactly [`MAX_SCRIPT_BYTES`] that prints its variables.
fn template(name: &str, variables: usize, pattern: &str, bytes: Option<usize>) -> (String, String) {
    let mut vars = String::new();
    for i in 0..variables {
        vars.push_str(&format!("[[variables]]\nname = \"v{i}\"\npattern = '{pattern}'\n"));
    }
    let head = |description: &str| {
        format!(
            "name = \"{name}\"\ndescription = \"{description}\"\nphase = \"operate\"\ndata_tags = [\"service:status\"]\n\
             body = \"run.sh\"\n\n{vars}"
        )
    };
    let mut manifest = head("at the cap");
    if let Some(bytes) = bytes {
        let pad = bytes - manifest.len() + "at the cap".len();
        manifest = head(&"x".repeat(pad));
        assert_eq!(manifest.len(), bytes);
    }
    let body = "#!/bin/sh\necho \"first=$AIRLOCK_VAR_V0 last=$AIRLOCK_VAR_V31\"\n";
    let script = format!("{body}#{}\n", "x".repeat(MAX_SCRIPT_BYTES - body.len() - 2));
    assert_eq!(script.len(), MAX_SCRIPT_BYTES);
    (manifest, script)
}

fn write_template(dir: &Path, (manifest, script): &(String, String)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("template.toml"), manifest).unwrap();
    std::fs::write(dir.join("run.sh"), script).unwrap();
    dir.to_owned()
}

/// Answers within `limit`, or fails the test naming what was slow.
fn answered_within<T>(limit: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    assert!(started.elapsed() < limit, "{what} took {:?}", started.elapsed());
    out
}

#[test]
fn a_template_at_every_cap_is_pushed_requested_and_run_while_both_sides_stay_responsive() {
    let d = Deployment::start(BIN, POLICY);
    let root = d.server.dir.path().to_owned();
    let at_cap = template("at-cap", MAX_VARIABLES, &pattern_at_cap(), Some(MAX_MANIFEST_BYTES));
    let dir = write_template(&root.join("at-cap"), &at_cap);

    // Pushes of templates at every cap (each new content is compiled anew), from four threads
    // at once, while API calls keep being answered.
    std::thread::scope(|s| {
        let pushers: Vec<_> = (0..4)
            .map(|t| {
                let (d, at_cap, root) = (&d, &at_cap, &root);
                s.spawn(move || {
                    for n in 0..3 {
                        // The same size, other content: `…xx\n` ends as `…{t}{n}\n`.
                        let (manifest, script) = at_cap;
                        let edited = (manifest.clone(), format!("{}{t}{n}\n", &script[..script.len() - 3]));
                        let dir = write_template(&root.join(format!("push-{t}-{n}")), &edited);
                        ok(d.server.cli(&["template", "push", dir.to_str().unwrap()]), "template push at the cap");
                    }
                })
            })
            .collect();
        while !pushers.iter().all(|p| p.is_finished()) {
            answered_within(Duration::from_secs(5), "listing appliances during pushes", || {
                d.server.ok(&["appliance", "list"])
            });
        }
        for p in pushers {
            p.join().unwrap();
        }
    });

    // The exact template at the cap is current; listing it and requesting it are prompt.
    answered_within(Duration::from_secs(5), "pushing the template at the cap", || {
        d.server.ok(&["template", "push", dir.to_str().unwrap()])
    });
    let listed = answered_within(Duration::from_secs(5), "listing templates", || d.server.ok(&["template", "list"]));
    assert!(listed.contains("at-cap"), "{listed}");
    let mut args: Vec<String> = ["op", "request", &d.env, "at-cap", "--reason", "at the cap"].map(str::to_owned).into();
    for i in 0..MAX_VARIABLES {
        args.extend(["--var".to_owned(), format!("v{i}={}", value_at_cap(i))]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = answered_within(Duration::from_secs(5), "requesting at the cap", || d.server.ok(&args));
    let id = out.lines().next().unwrap().trim().to_owned();

    // The appliance loads it, re-renders it, waits for the customer and runs it.
    d.wait_state(&id, "awaiting_approval");
    d.approve(&id);
    let op = d.wait_state(&id, "executed");
    assert_eq!(op["exit_code"], 0, "{op}");
    let health = d.server.appliance(&d.appliance_id);
    assert_eq!(health["connected"], true, "the appliance stays connected: {health}");
}

#[test]
fn templates_over_a_cap_or_costly_to_compile_are_refused_fast_with_limit_exceeded() {
    let d = Deployment::start(BIN, POLICY);
    let root = d.server.dir.path().to_owned();
    for (name, t, expect) in [
        // The issue's case: 200 variables of `\w{100}` took 10.4 s and 1.17 GB to compile.
        ("pathological", template("pathological", 200, r"\w{100}", None), "variables; at most"),
        ("costly", template("costly", MAX_VARIABLES, r"\w{100}", None), "compiles past the limit"),
        ("too-many", template("too-many", MAX_VARIABLES + 1, "[a-z]+", None), "variables; at most"),
        ("long-pattern", template("long-pattern", 1, &"a".repeat(MAX_PATTERN_BYTES + 1), None), "at most 256"),
        ("too-big", template("too-big", 1, "[a-z]+", Some(MAX_MANIFEST_BYTES + 1)), "template.toml is"),
    ] {
        let dir = write_template(&root.join(name), &t);
        let out = answered_within(Duration::from_secs(3), name, || {
            d.server.cli(&["template", "push", dir.to_str().unwrap()])
        });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(stderr.contains("HTTP 422") && stderr.contains(expect), "{name}: {stderr}");
    }
    let listed = d.server.ok(&["template", "list"]);
    assert!(!listed.contains("pathological") && !listed.contains("costly"), "nothing over a limit is stored: {listed}");
    let refused = d.server.audited("template.push", "error");
    assert!(refused.len() >= 5, "every refusal is audited: {refused:?}");
}

//! A template as a vendor pushes it (`template.toml`, NUL, script), rendered when it loads.
#![no_main]
use std::collections::BTreeMap;

use airlock_core::template::Template;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (manifest, script) = airlock_fuzz::split(data);
    let (Ok(manifest), Ok(script)) = (std::str::from_utf8(manifest), std::str::from_utf8(script)) else {
        return;
    };
    let _ = airlock_core::template::TemplateManifest::parse(manifest);
    if let Ok(t) = Template::new(manifest, script) {
        // Every variable set to a line of the script: values that match and values that do not.
        let lines: Vec<&str> = script.lines().collect();
        let values: BTreeMap<String, String> = t
            .manifest()
            .variables
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), lines.get(i).copied().unwrap_or("1").to_owned()))
            .collect();
        if let Ok(command) = t.render(&values) {
            assert_eq!(command.template_sha256, t.content_sha256());
            let _ = command.sha256();
        }
    }
});

//! Alert rule files: any text gives rules or an error naming file, line and field; never a panic.
#![no_main]

use bearwatch::config::ConfigError;
use bearwatch::detect::RuleFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match RuleFile::parse(text, "fuzz.toml") {
        Ok(_) => {}
        Err(ConfigError::Invalid { file, line, .. }) => assert!(file == "fuzz.toml" && line <= text.lines().count() + 1),
        Err(ConfigError::Read { .. }) => {}
    }
});

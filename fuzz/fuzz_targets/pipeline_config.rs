//! Pipeline TOML: any text gives a config or an error naming file, line and field; never a panic.
#![no_main]

use bearwatch::config::ConfigError;
use bearwatch::pipeline::PipelineConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match PipelineConfig::parse(text, "fuzz.toml") {
        Ok(config) => {
            let _ = config.check_role();
        }
        Err(ConfigError::Invalid { file, line, .. }) => assert!(file == "fuzz.toml" && line <= text.lines().count() + 1),
        Err(ConfigError::Read { .. }) => {}
    }
});

//! A model folder's `labels.json` and `heads.json` (split at the first NUL byte): any bytes give a
//! spec or a clear error, and a spec that loads scores outputs of the widths it declares; never a
//! panic.
#![no_main]

use bearwatch::classify::ModelSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (labels, heads) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let dir = tempfile::tempdir().unwrap();
    for (file, bytes) in [("labels.json", labels), ("heads.json", heads), ("model.onnx", &[][..]), ("tokenizer.json", &[][..])] {
        std::fs::write(dir.path().join(file), bytes).unwrap();
    }
    if let Ok(spec) = ModelSpec::load(dir.path()) {
        let scores = spec.scores(&[0.2, 0.3, 0.5], &vec![0.1; spec.topics.len()]);
        assert!(spec.topics.contains(&scores.topic));
        if let Some(heads) = &spec.heads {
            let _ = heads.apply(&vec![0.5; heads.dims], 1);
        }
    }
});

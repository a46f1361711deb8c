//! The story ids de-duplication remembers, as keys: the first 16 bytes of each id's SHA-256. An id
//! may be 256 characters, and a million of them (the default `dedup_max_ids`) held about 300 MB
//! and made every checkpoint 275 MB, rewritten each `checkpoint_interval`. A key is 16 bytes
//! whatever the id, and 128 bits keep two different ids apart (finding two that collide is out of
//! reach). Checkpoints keep them as base64 of 24 bytes an id: the key, then the event time in ms
//! (little-endian).

use std::collections::HashMap;

use base64::Engine;
use sha2::Digest;

pub type IdKey = [u8; 16];

/// Remembered ids and the event time of the story each came with.
pub type Seen = HashMap<IdKey, i64>;

pub fn key(id: &str) -> IdKey {
    let digest = sha2::Sha256::digest(id.as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

const RECORD: usize = 24;

/// What a checkpoint writes.
pub fn encode(seen: &Seen) -> String {
    let mut bytes = Vec::with_capacity(seen.len() * RECORD);
    for (key, event_ms) in seen {
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(&event_ms.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// What a checkpoint wrote, and the ids one written before keys (`seen` in full) held.
pub fn decode(text: &str, ids: &[(String, i64)]) -> Result<Vec<(IdKey, i64)>, String> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| format!("seen ids: {e}"))?;
    if bytes.len() % RECORD != 0 {
        return Err(format!("seen ids: {} bytes, not a whole number of {RECORD}-byte records", bytes.len()));
    }
    let keys = bytes.chunks_exact(RECORD).map(|record| {
        let (key, time) = record.split_at(16);
        let mut id = [0u8; 16];
        id.copy_from_slice(key);
        let mut ms = [0u8; 8];
        ms.copy_from_slice(time);
        (id, i64::from_le_bytes(ms))
    });
    Ok(ids.iter().map(|(id, event_ms)| (key(id), *event_ms)).chain(keys).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_go_through_a_checkpoint_and_old_checkpoints_ids_become_keys() {
        let seen: Seen = (0..1000).map(|i| (key(&format!("story-{i}")), 1_700_000_000_000 + i)).collect();
        let text = encode(&seen);
        assert_eq!(text.len(), 1000 * RECORD / 3 * 4, "24 bytes an id, as base64");
        let back: Seen = decode(&text, &[]).unwrap().into_iter().collect();
        assert_eq!(back, seen);
        let old: Seen = decode("", &[("story-7".into(), 5)]).unwrap().into_iter().collect();
        assert_eq!(old, Seen::from([(key("story-7"), 5)]));
        assert_ne!(key("story-7"), key("story-8"));
        assert_eq!(key(&"x".repeat(256)).len(), 16);
        assert!(decode("AAAA", &[]).unwrap_err().contains("whole number"));
        assert!(decode("not base64!", &[]).is_err());
    }
}

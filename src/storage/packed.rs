//! A big checkpoint written in pieces that are kept while they do not change.
//!
//! A checkpoint is the whole state serialised as one JSON object: tens of MB on a busy feed (the
//! tracked stories, the kept windows, the recent copies), of which one checkpoint interval changes
//! a few percent. From [`WHOLE_BELOW`] bytes on, the JSON is cut where its content says (a rolling
//! hash over the last 64 bytes, so that an insertion moves no cut but its own) into pieces of about
//! 12 KiB. Pieces that the last committed checkpoint stored are referenced where they lie; only new
//! ones are written, each zstd-compressed, into one pack per checkpoint,
//! `<checkpoint>.packs/<writer>-<commit>.pack`. The checkpoint file itself is then a manifest,
//! `{"packed": …}`: the packs, and each piece's pack, place and digest, in order. Read back, each
//! piece is checked against its digest and the pieces are joined: the same bytes as the whole JSON.
//!
//! A pack is deleted once a committed checkpoint no longer references it; one of which less than
//! half still serves is dissolved (its live pieces written again into the new pack), so the packs
//! hold at most about twice what the checkpoint needs.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

/// Below this size a checkpoint is written whole, as one JSON file: pieces would save little.
pub(super) const WHOLE_BELOW: usize = 1 << 20;
const MIN_PIECE: usize = 4 << 10;
const MAX_PIECE: usize = 64 << 10;
/// A piece ends where the rolling hash's top bits are all zero: one chance in 8 Ki per byte past
/// [`MIN_PIECE`], about 12 KiB a piece. Smaller pieces write less per change (each new story
/// changes a few places of the JSON, one piece each) and list more in the manifest.
const CUT_BITS: u32 = 13;
const LEVEL: i32 = 3;

/// The gear table of the rolling hash: fixed, so that the same bytes are cut the same way by every
/// version (a changed table would only cost writing every piece once).
const GEAR: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut state: u64 = 0;
    let mut i = 0;
    while i < 256 {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
};

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    packed: Packed,
}

/// What a packed checkpoint's file holds.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Packed {
    /// Length of the joined JSON.
    bytes: u64,
    /// The packs the pieces lie in: name and size.
    packs: Vec<(String, u64)>,
    /// The pieces in order: index into `packs`, offset and length of its compressed frame there,
    /// and the first 128 bits of the SHA-256 of its bytes, in hex.
    pieces: Vec<(usize, u64, u64, String)>,
}

#[derive(Clone, Debug, PartialEq)]
struct Spot {
    pack: String,
    at: u64,
    len: u64,
}

/// Where the last committed checkpoint's pieces lie: what the next one references instead of
/// writing them again.
#[derive(Default, Clone, Debug)]
pub(super) struct Stored {
    pieces: HashMap<String, Spot>,
    packs: BTreeMap<String, u64>,
    /// Packs no committed checkpoint references that are still there (written for a commit that
    /// failed, or their deletion failed): deleted after the next commit that succeeds.
    unreferenced: Vec<String>,
}

/// A checkpoint ready to be written: the file, and the pack to write before it (none when every
/// piece is stored already, or when the checkpoint is written whole).
pub(super) struct Encoded {
    pub file: Vec<u8>,
    pub pack: Option<(String, Vec<u8>)>,
    pub stored: Stored,
}

impl Stored {
    /// The packs to delete once `next` is committed in place of this one.
    pub fn unused_after(&self, next: &Stored) -> Vec<String> {
        let unused: std::collections::BTreeSet<&String> = self.packs.keys().chain(&self.unreferenced).filter(|name| !next.packs.contains_key(*name)).collect();
        unused.into_iter().cloned().collect()
    }

    /// Notes a pack written for a commit that failed, or one whose deletion failed: deleted after
    /// the next commit that succeeds.
    pub fn unreferenced(&mut self, pack: String) {
        self.unreferenced.push(pack);
    }

    pub fn packs(&self) -> impl Iterator<Item = &String> {
        self.packs.keys()
    }
}

/// The folder of a checkpoint file's packs: `checkpoint.packs` beside `checkpoint.json`.
pub(super) fn folder(checkpoint: &str) -> String {
    format!("{}.packs", checkpoint.strip_suffix(".json").unwrap_or(checkpoint))
}

/// The checkpoint `json` as written: whole under [`WHOLE_BELOW`], else as a manifest of pieces,
/// with the new ones in a pack named `pack`.
pub(super) fn encode(json: Vec<u8>, last: &Stored, pack: &str) -> Result<Encoded, String> {
    if json.len() < WHOLE_BELOW {
        return Ok(Encoded { file: json, pack: None, stored: Stored::default() });
    }
    let pieces: Vec<(&[u8], String)> = split(&json).into_iter().map(|piece| (piece, digest(piece))).collect();
    // How much of each stored pack this checkpoint still references.
    let mut live: HashMap<&str, u64> = HashMap::new();
    let mut counted = HashSet::new();
    for (_, digest) in &pieces {
        if let Some(spot) = last.pieces.get(digest)
            && counted.insert(digest)
        {
            *live.entry(spot.pack.as_str()).or_default() += spot.len;
        }
    }
    let kept = |spot: &Spot| live.get(spot.pack.as_str()).is_some_and(|&live| live * 2 >= last.packs.get(&spot.pack).copied().unwrap_or(0));
    let mut frames = Vec::new();
    let mut stored = Stored::default();
    let mut spots = Vec::with_capacity(pieces.len());
    for (piece, digest) in pieces {
        let spot = match stored.pieces.get(&digest).or_else(|| last.pieces.get(&digest).filter(|spot| kept(spot))) {
            Some(spot) => spot.clone(),
            None => {
                let frame = zstd::bulk::compress(piece, LEVEL).map_err(|e| format!("compressing a piece: {e}"))?;
                let spot = Spot { pack: pack.to_string(), at: frames.len() as u64, len: frame.len() as u64 };
                frames.extend_from_slice(&frame);
                spot
            }
        };
        stored.pieces.insert(digest.clone(), spot.clone());
        spots.push((spot, digest));
    }
    if !frames.is_empty() {
        stored.packs.insert(pack.to_string(), frames.len() as u64);
    }
    for spot in stored.pieces.values() {
        if let Some(&size) = last.packs.get(&spot.pack) {
            stored.packs.insert(spot.pack.clone(), size);
        }
    }
    let packs: Vec<(String, u64)> = stored.packs.iter().map(|(name, size)| (name.clone(), *size)).collect();
    let index: HashMap<&str, usize> = packs.iter().enumerate().map(|(i, (name, _))| (name.as_str(), i)).collect();
    let pieces = spots.into_iter().map(|(spot, digest)| (index[spot.pack.as_str()], spot.at, spot.len, digest)).collect();
    let manifest = Manifest { packed: Packed { bytes: json.len() as u64, packs, pieces } };
    let file = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    Ok(Encoded { file, pack: (!frames.is_empty()).then(|| (pack.to_string(), frames)), stored })
}

/// The manifest in a checkpoint file, if it is one (else the file is the whole JSON).
pub(super) fn manifest(file: &[u8]) -> Result<Option<Packed>, String> {
    if !file.starts_with(br#"{"packed":"#) {
        return Ok(None);
    }
    serde_json::from_slice::<Manifest>(file).map(|m| Some(m.packed)).map_err(|e| e.to_string())
}

/// Why pieces could not be joined.
#[derive(Debug)]
pub(super) enum JoinError {
    /// A pack is not there: deleted by its writer after a newer checkpoint (read the file again),
    /// or lost.
    Missing(String),
    Corrupt(String),
}

impl Packed {
    pub fn pack_names(&self) -> impl Iterator<Item = &String> {
        self.packs.iter().map(|(name, _)| name)
    }

    /// The whole JSON from the packs' bytes (in the order of [`Packed::pack_names`]), each piece
    /// checked against its digest; and where the pieces lie, for the next checkpoint.
    pub fn join(&self, files: Vec<Option<Vec<u8>>>) -> Result<(Vec<u8>, Stored), JoinError> {
        let corrupt = |what: String| JoinError::Corrupt(what);
        let mut found = Vec::with_capacity(files.len());
        for ((name, size), file) in self.packs.iter().zip(files) {
            let file = file.ok_or_else(|| JoinError::Missing(name.clone()))?;
            if file.len() as u64 != *size {
                return Err(corrupt(format!("pack {name} holds {} bytes, not {size}", file.len())));
            }
            found.push(file);
        }
        // A damaged manifest must not ask for more memory than its pieces can hold.
        let limit = usize::try_from(self.bytes).ok().filter(|&bytes| bytes <= self.pieces.len().saturating_mul(MAX_PIECE));
        let limit = limit.ok_or_else(|| corrupt(format!("{} pieces cannot hold {} bytes", self.pieces.len(), self.bytes)))?;
        let mut json = Vec::with_capacity(limit);
        let mut stored = Stored::default();
        for (pack, at, len, digest) in &self.pieces {
            let (name, file) = self.packs.get(*pack).map(|(name, _)| name).zip(found.get(*pack)).ok_or_else(|| corrupt(format!("piece {digest} names pack {pack} of {}", self.packs.len())))?;
            let frame = usize::try_from(*at).ok().zip(usize::try_from(*len).ok()).and_then(|(at, len)| file.get(at..at.checked_add(len)?));
            let frame = frame.ok_or_else(|| corrupt(format!("piece {digest} lies past the end of pack {name}")))?;
            let piece = zstd::bulk::decompress(frame, MAX_PIECE).map_err(|e| corrupt(format!("piece {digest} in pack {name}: {e}")))?;
            if self::digest(&piece) != *digest {
                return Err(corrupt(format!("piece {digest} in pack {name} does not match its digest")));
            }
            if json.len() + piece.len() > limit {
                return Err(corrupt(format!("the pieces add up to more than {limit} bytes")));
            }
            json.extend_from_slice(&piece);
            stored.pieces.insert(digest.clone(), Spot { pack: name.clone(), at: *at, len: *len });
        }
        if json.len() != limit {
            return Err(corrupt(format!("the pieces add up to {} bytes, not {limit}", json.len())));
        }
        stored.packs = self.packs.iter().cloned().collect();
        Ok((json, stored))
    }
}

/// Cuts `bytes` where a gear hash of the last 64 bytes has its top [`CUT_BITS`] bits zero, each
/// piece [`MIN_PIECE`] to [`MAX_PIECE`] long (the last may be shorter).
fn split(bytes: &[u8]) -> Vec<&[u8]> {
    let mut pieces = Vec::with_capacity(bytes.len() / (MIN_PIECE + (1 << CUT_BITS)) + 1);
    let mut rest = bytes;
    while !rest.is_empty() {
        let end = rest.len().min(MAX_PIECE);
        let mut cut = end;
        let mut hash = 0u64;
        // Each byte's part of the hash is shifted out after 64 more: hashing from 64 bytes before
        // the first possible cut gives the same hash as from the start of the piece.
        let from = (MIN_PIECE - 64).min(end);
        for (i, &byte) in rest[..end].iter().enumerate().skip(from) {
            hash = (hash << 1).wrapping_add(GEAR[byte as usize]);
            if i + 1 >= MIN_PIECE && hash >> (64 - CUT_BITS) == 0 {
                cut = i + 1;
                break;
            }
        }
        let (piece, after) = rest.split_at(cut);
        pieces.push(piece);
        rest = after;
    }
    pieces
}

/// The first 128 bits of the SHA-256 of `piece`, in hex: what names a piece.
fn digest(piece: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(piece)[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSON-like text of `n` records, each different.
    fn state(n: usize, salt: &str) -> Vec<u8> {
        records(0..n, salt)
    }

    fn records(ids: std::ops::Range<usize>, salt: &str) -> Vec<u8> {
        let mut json = format!("{{\"written_at\":\"{salt}\",\"tracked\":[");
        for i in ids {
            json += &format!("{{\"id\":\"s{i}\",\"headline\":\"Shares of company {i} fell {} percent after the {} report\",\"score\":{}}},", i % 97, i * 7919 % 1013, (i as f64).sin());
        }
        json += "0]}";
        json.into_bytes()
    }

    fn join(encoded: &Encoded, packs: &HashMap<String, Vec<u8>>) -> Result<(Vec<u8>, Stored), JoinError> {
        let packed = manifest(&encoded.file).unwrap().expect("a manifest");
        let files = packed.pack_names().map(|name| packs.get(name).cloned()).collect();
        packed.join(files)
    }

    #[test]
    fn pieces_are_cut_by_content_so_an_insertion_moves_no_other_cut() {
        let before = state(20_000, "a");
        let pieces = split(&before);
        assert_eq!(pieces.concat(), before);
        assert!(pieces.iter().rev().skip(1).all(|p| (MIN_PIECE..=MAX_PIECE).contains(&p.len())));
        let average = before.len() / pieces.len();
        assert!((6 << 10..20 << 10).contains(&average), "{average} bytes a piece");
        // Twelve bytes in the middle change one or two pieces, not the ones after them.
        let mut after = before.clone();
        let middle = after.len() / 2;
        after.splice(middle..middle, b"inserted ...".iter().copied());
        let old: HashSet<&[u8]> = pieces.iter().copied().collect();
        let changed = split(&after).into_iter().filter(|p| !old.contains(p)).count();
        assert!((1..=2).contains(&changed), "{changed} pieces changed");
    }

    #[test]
    fn a_small_checkpoint_is_written_whole() {
        let json = state(10, "a");
        let encoded = encode(json.clone(), &Stored::default(), "p-1").unwrap();
        assert_eq!(encoded.file, json);
        assert!(encoded.pack.is_none() && manifest(&encoded.file).unwrap().is_none());
    }

    #[test]
    fn a_big_checkpoint_writes_only_new_pieces_and_joins_back_to_the_same_bytes() {
        let mut packs = HashMap::new();
        let first = state(20_000, "2026-12-07T10:00:00Z");
        let one = encode(first.clone(), &Stored::default(), "w-1").unwrap();
        let (name, pack) = one.pack.clone().unwrap();
        assert!(pack.len() * 3 < first.len(), "compressed: {} of {}", pack.len(), first.len());
        packs.insert(name, pack);
        let (joined, stored) = join(&one, &packs).unwrap();
        assert_eq!(joined, first);

        // The next checkpoint: another time, and 20 records more at the end.
        let second = state(20_020, "2026-12-07T10:00:10Z");
        let two = encode(second.clone(), &stored, "w-2").unwrap();
        let (name, pack) = two.pack.clone().unwrap();
        assert!(pack.len() * 20 < packs["w-1"].len(), "new pieces only: {} bytes against {}", pack.len(), packs["w-1"].len());
        packs.insert(name, pack);
        let (joined, stored_two) = join(&two, &packs).unwrap();
        assert_eq!(joined, second);
        assert!(stored.unused_after(&stored_two).is_empty(), "w-1 still serves");

        // The same state again: nothing new to write.
        let again = encode(second.clone(), &stored_two, "w-3").unwrap();
        assert!(again.pack.is_none());
        assert_eq!(join(&again, &packs).unwrap().0, second);
    }

    #[test]
    fn a_pack_that_serves_less_than_half_is_dissolved_and_then_deleted() {
        let mut packs = HashMap::new();
        let first = state(20_000, "a");
        let one = encode(first, &Stored::default(), "w-1").unwrap();
        packs.insert("w-1".to_string(), one.pack.clone().unwrap().1);
        // Most of the state replaced: what w-1 still holds goes into w-2 with the new pieces.
        let mut second = state(20_000, "a");
        second.truncate(second.len() * 2 / 5);
        second.extend_from_slice(&records(100_000..112_000, "a"));
        let two = encode(second.clone(), &one.stored, "w-2").unwrap();
        assert_eq!(one.stored.unused_after(&two.stored), vec!["w-1".to_string()]);
        packs.insert("w-2".to_string(), two.pack.clone().unwrap().1);
        packs.remove("w-1");
        assert_eq!(join(&two, &packs).unwrap().0, second);
        // A pack of a failed commit goes after the next one that succeeds.
        let mut last = two.stored.clone();
        last.unreferenced("w-3".into());
        let four = encode(second, &last, "w-4").unwrap();
        assert_eq!(last.unused_after(&four.stored), vec!["w-3".to_string()]);
    }

    #[test]
    fn damaged_or_missing_packs_are_told_apart() {
        let one = encode(state(20_000, "a"), &Stored::default(), "w-1").unwrap();
        let (name, pack) = one.pack.clone().unwrap();
        assert!(matches!(join(&one, &HashMap::new()), Err(JoinError::Missing(n)) if n == name));
        let mut flipped = pack.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 0x55;
        assert!(matches!(join(&one, &HashMap::from([(name.clone(), flipped)])), Err(JoinError::Corrupt(_))));
        assert!(matches!(join(&one, &HashMap::from([(name.clone(), pack[1..].to_vec())])), Err(JoinError::Corrupt(_))));
        // A manifest that claims more than its pieces can hold asks for no memory.
        let mut packed = manifest(&one.file).unwrap().unwrap();
        packed.bytes = u64::MAX;
        assert!(matches!(packed.join(vec![Some(pack)]), Err(JoinError::Corrupt(reason)) if reason.contains("cannot hold")));
    }
}

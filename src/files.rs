//! What every writer of local files needs when the disk can fill up or the process can die mid-write:
//! a file replaced whole or not at all, and an append that leaves a whole line or nothing.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `bytes` whole: written beside it (`<path>.tmp`), fsynced, renamed over it,
/// and the folder fsynced, so that a crash leaves the old file or the new one, never a torn one. A
/// write that fails (a full disk) leaves no temp file behind.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let written = File::create(&temp)
        .and_then(|mut file| file.write_all(bytes).and_then(|()| file.sync_all()))
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all())
}

/// Appends `bytes` to `file` (opened to append) and makes them durable. A write that fails part way
/// (a full disk) is cut back off, so that what the next append writes does not run into a torn end.
pub fn append_whole(file: &mut File, bytes: &[u8]) -> io::Result<()> {
    let length = file.metadata()?.len();
    let written = file.write_all(bytes).and_then(|()| file.sync_data());
    if written.is_err() {
        let _ = file.set_len(length);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_that_fails_leaves_the_old_file_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // A folder where the file should go: the rename fails.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        assert!(replace(&blocked, b"three").is_err());
        assert!(!dir.path().join("blocked.tmp").exists());
    }

    #[test]
    fn an_append_the_disk_refuses_is_an_error_and_whole_appends_follow_each_other() {
        let mut full = std::fs::OpenOptions::new().append(true).open("/dev/full").unwrap();
        assert!(append_whole(&mut full, b"line\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.jsonl");
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
        append_whole(&mut file, b"a\n").unwrap();
        append_whole(&mut file, b"b\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"a\nb\n");
    }
}

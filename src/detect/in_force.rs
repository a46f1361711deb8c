//! The rules a pipeline evaluates now, shared with its API (`/api/bands`, the review queue, the
//! rules hash each verdict records): a reload of the rule files replaces them whole, or leaves them
//! as they are and keeps why it could not.

use std::sync::{Arc, RwLock};

use super::Rule;
use crate::sync::write;

#[derive(Clone, Default)]
pub struct InForce(Arc<RwLock<Loaded>>);

#[derive(Default)]
struct Loaded {
    rules: Vec<Rule>,
    /// SHA-256 over the rule files as read.
    hash: Option<String>,
    /// Why the last reload was refused; cleared by one that succeeds.
    refused: Option<String>,
}

impl InForce {
    pub fn new(rules: Vec<Rule>, hash: Option<String>) -> InForce {
        InForce(Arc::new(RwLock::new(Loaded { rules, hash, refused: None })))
    }

    pub fn rules(&self) -> Vec<Rule> {
        self.read(|loaded| loaded.rules.clone())
    }

    pub fn hash(&self) -> Option<String> {
        self.read(|loaded| loaded.hash.clone())
    }

    pub fn refused(&self) -> Option<String> {
        self.read(|loaded| loaded.refused.clone())
    }

    pub fn replace(&self, rules: Vec<Rule>, hash: Option<String>) {
        *write(&self.0) = Loaded { rules, hash, refused: None };
    }

    pub fn refuse(&self, why: String) {
        write(&self.0).refused = Some(why);
    }

    fn read<T>(&self, f: impl FnOnce(&Loaded) -> T) -> T {
        f(&crate::sync::read(&self.0))
    }
}

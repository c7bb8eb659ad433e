//! An ordered log that several fakes write to, so a unit test sees the order of side effects
//! across seams (kernel calls, the cgroup, CNI plugins). Compiled for tests only.

use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct Journal(Arc<Mutex<Vec<String>>>);

impl Journal {
    pub fn note(&self, line: impl Into<String>) {
        self.0.lock().unwrap().push(line.into());
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

//! What a container holds on the host, one [`Release`] step per thing, each giving that thing
//! back through the seam that made it. A failed start runs the steps of its finished stages in
//! reverse; `rm` runs the steps its saved state names.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cgroup::CgroupManager;
use crate::cni::Cni;
use crate::fsutil;
use crate::netns;
use crate::state::CniRecord;
use crate::syscall::Syscall;

pub enum Release<'a> {
    /// The CNI attachment: DEL through the network's plugins with the cached result frees the
    /// address and the host side of the interface.
    Attachment { cni: &'a Cni, record: CniRecord },
    /// The pinned network namespace.
    Netns { sys: &'a dyn Syscall, path: PathBuf },
    /// The cgroup: what is left in it is killed.
    Cgroup(&'a dyn CgroupManager),
    /// A directory tree of the container's: its state, or its layers when a start is undone.
    Tree(PathBuf),
    /// The container's layer directory (upper and work) on `rm`: renamed aside at once and
    /// removed by a detached child ([`fsutil::set_aside`], [`fsutil::sweep_detached`]), which
    /// also removes what an earlier crash left set aside; removed in place if it cannot be
    /// renamed or the child cannot be started.
    Layers(PathBuf),
    /// The name reservation, unless the name now belongs to another container.
    Name { link: PathBuf, id: String },
}

impl Release<'_> {
    /// The step's name for the `TWEED_TIMING` trace.
    pub fn label(&self) -> &'static str {
        match self {
            Release::Attachment { .. } => "release: attachment",
            Release::Netns { .. } => "release: netns",
            Release::Cgroup(_) => "release: cgroup",
            Release::Tree(_) => "release: tree",
            Release::Layers(_) => "release: layers set aside",
            Release::Name { .. } => "release: name",
        }
    }

    /// Gives the thing back; one that is already gone is fine.
    pub fn run(&self) -> Result<(), String> {
        match self {
            Release::Attachment { cni, record } => cni
                .del(&record.list, &record.attachment, record.result.as_ref())
                .map_err(|e| e.to_string()),
            Release::Netns { sys, path } => netns::remove(*sys, path).map_err(|e| e.to_string()),
            Release::Cgroup(cg) => cg.remove().map_err(|e| e.to_string()),
            Release::Tree(p) => fsutil::remove_tree(p).map_err(|e| format!("{}: {e}", p.display())),
            Release::Layers(p) => {
                let deferred = match fsutil::set_aside(p) {
                    Ok(false) => return Ok(()),
                    Ok(true) => p.parent().map(fsutil::sweep_detached),
                    Err(_) => None,
                };
                match deferred {
                    Some(Ok(())) => Ok(()),
                    // The sweep could not start: remove now what the rename set aside (or,
                    // when the rename failed, the directory itself).
                    _ => {
                        let gone = p.with_file_name(format!(
                            "{}{}",
                            fsutil::GONE_PREFIX,
                            p.file_name().unwrap_or_default().to_string_lossy()
                        ));
                        fsutil::remove_tree(&gone)
                            .and_then(|()| fsutil::remove_tree(p))
                            .map_err(|e| format!("{}: {e}", p.display()))
                    }
                }
            }
            Release::Name { link, id } => {
                if fs::read_link(link).is_ok_and(|t| t == Path::new(id)) {
                    let _ = fs::remove_file(link);
                }
                Ok(())
            }
        }
    }
}

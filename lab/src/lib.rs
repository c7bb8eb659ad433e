//! tweed-lab: a whole tweed cluster on one machine, each host a network namespace.
//!
//! * [`spec`]: what to build ([`LabSpec`], [`Backend`]) and the checks before building.
//! * [`Lab`]: `up`, `load`, `exec`; [`LabGuard`] downs on Drop. `up` builds, in order:
//!   [`topology`] (underlay, outside, host namespaces), [`etcd_cluster`] (the lab's etcd, on top
//!   of the process harness [`etcd`], which tests use alone), [`agents`] (tweedd per host) and
//!   [`pods`] (through the tweed CNI plugin ([`cni`]), as tweedctl containers ([`containers`]), or
//!   wired directly).
//! * [`status`], [`check`], [`down`]: what `tweed-lab status`, `check` and `down` do.
//! * [`state`]: `state.json`, which lets another process (and a later `tweed-lab`) find it all.
//!
//! Nothing here configures the root network namespace: every link, address and route is created
//! inside namespaces named `twl-<lab>-...`.

/// A fieldless enum spelled as fixed strings: `as_str`, `Display`, `FromStr` (an error naming the
/// choices) and serde as that string.
macro_rules! string_enum {
    ($ty:ident, $what:literal, { $($variant:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $s,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($ty::$variant),)+
                    other => Err(format!(
                        "unknown {} {other:?}: expected {}",
                        $what,
                        $crate::one_of(&[$($s),+])
                    )),
                }
            }
        }

        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as serde::de::Error>::custom)
            }
        }
    };
}

/// `a, b or c`
fn one_of(choices: &[&str]) -> String {
    match choices {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

pub mod agents;
pub mod check;
pub mod cmd;
pub mod cni;
pub mod containers;
pub mod down;
pub mod error;
pub mod etcd;
pub mod etcd_cluster;
pub mod lab;
pub mod names;
pub mod netns;
pub mod pods;
pub mod spec;
pub mod state;
pub mod status;
pub mod topology;

pub use check::{CheckReport, PingResult};
pub use down::{down, down_in, DownReport};
pub use error::LabError;
pub use lab::{Lab, LabGuard};
pub use pods::PodsVia;
pub use spec::{Backend, LabSpec};
pub use status::{EtcdMemberStatus, Status};

#[cfg(test)]
mod tests {
    #[test]
    fn choices_read_as_a_list() {
        assert_eq!(super::one_of(&["a"]), "a");
        assert_eq!(super::one_of(&["a", "b", "c"]), "a, b or c");
    }
}

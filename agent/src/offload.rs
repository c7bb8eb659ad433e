//! The vxlan device's transmit checksum offload, through the `ethtool` binary (the ioctl's
//! feature-string table would otherwise have to be read and matched by hand).

use std::process::{Command, Stdio};

const FEATURE: &str = "tx-checksum-ip-generic";

#[derive(Debug, thiserror::Error)]
pub enum OffloadError {
    #[error("ethtool {args}: {reason}")]
    Ethtool { args: String, reason: String },
    #[error("ethtool -k {device}: no {FEATURE} line in its output")]
    Unknown { device: String },
}

/// Whether `ethtool -k` output says the feature is on; `None` when it does not list it.
pub fn feature_on(ethtool_k: &str, feature: &str) -> Option<bool> {
    ethtool_k.lines().find_map(|l| {
        let (name, value) = l.trim().split_once(':')?;
        (name == feature).then(|| value.trim_start().starts_with("on"))
    })
}

fn ethtool(args: &[&str]) -> Result<String, OffloadError> {
    let err = |reason: String| OffloadError::Ethtool {
        args: args.join(" "),
        reason,
    };
    let out = Command::new("ethtool")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Turns tx-checksum-ip-generic off on `device` unless it already is; returns whether it changed
/// anything. Blocking (forks ethtool).
pub fn tx_csum_off(device: &str) -> Result<bool, OffloadError> {
    let unknown = || OffloadError::Unknown {
        device: device.to_string(),
    };
    match feature_on(&ethtool(&["-k", device])?, FEATURE) {
        None => Err(unknown()),
        Some(false) => Ok(false),
        Some(true) => {
            ethtool(&["-K", device, FEATURE, "off"])?;
            match feature_on(&ethtool(&["-k", device])?, FEATURE) {
                Some(false) => Ok(true),
                Some(true) => Err(OffloadError::Ethtool {
                    args: format!("-K {device} {FEATURE} off"),
                    reason: "the feature is still on afterwards".into(),
                }),
                None => Err(unknown()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethtool_k_output() {
        let out = "Features for tweed.1:\n\
                   tx-checksumming: on\n\
                   \ttx-checksum-ipv4: off [fixed]\n\
                   \ttx-checksum-ip-generic: on\n\
                   \ttx-checksum-ipv6: off [fixed]\n";
        assert_eq!(feature_on(out, FEATURE), Some(true));
        assert_eq!(feature_on(out, "tx-checksum-ipv4"), Some(false));
        assert_eq!(feature_on(out, "tx-checksumming"), Some(true));
        assert_eq!(feature_on(out, "rx-gro-hw"), None);
        let off = out.replace("ip-generic: on", "ip-generic: off [requested on]");
        assert_eq!(feature_on(&off, FEATURE), Some(false));
        assert_eq!(feature_on("", FEATURE), None);
        assert_eq!(feature_on("tx-checksum-ip-generic", FEATURE), None);
    }
}

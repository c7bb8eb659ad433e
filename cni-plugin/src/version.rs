//! The spec versions tweed speaks.

/// Oldest first. 0.1.0 and 0.2.0 results (`ip4`/`ip6` objects) are not produced.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const LATEST: &str = "1.1.0";

/// A parsed `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    pub fn parse(s: &str) -> Option<Version> {
        let mut it = s.split('.').map(|p| p.parse::<u32>().ok());
        let v = Version(it.next()??, it.next()??, it.next()??);
        it.next().is_none().then_some(v)
    }

    pub fn is_supported(s: &str) -> bool {
        SUPPORTED.contains(&s)
    }
}

/// The VERSION answer.
pub fn version_doc(cni_version: &str) -> String {
    let v = if Version::is_supported(cni_version) {
        cni_version
    } else {
        LATEST
    };
    serde_json::json!({"cniVersion": v, "supportedVersions": SUPPORTED}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_and_parse() {
        assert!(Version::parse("0.3.1").unwrap() < Version::V0_4_0);
        assert!(Version::parse("1.1.0").unwrap() > Version::V1_0_0);
        assert_eq!(Version::parse("1.0"), None);
        assert_eq!(Version::parse("1.0.0.0"), None);
        assert_eq!(Version::parse("x.y.z"), None);
        for v in SUPPORTED {
            assert!(Version::parse(v).is_some());
        }
        assert!(!Version::is_supported("0.2.0"));
        assert!(!Version::is_supported("2.0.0"));
    }

    #[test]
    fn version_doc_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_doc("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let v: serde_json::Value = serde_json::from_str(&version_doc("9.9.9")).unwrap();
        assert_eq!(v["cniVersion"], LATEST);
    }
}

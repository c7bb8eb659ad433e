//! The error codes of the CNI spec (0-99) and tweed's own (100 and up). Every module's error
//! enum maps itself onto these; [`crate::error`] turns them into the document on stdout.

pub const INCOMPATIBLE_VERSION: u32 = 1;
pub const UNSUPPORTED_FIELD: u32 = 2;
pub const UNKNOWN_CONTAINER: u32 = 3;
pub const INVALID_ENV: u32 = 4;
pub const IO: u32 = 5;
pub const DECODE: u32 = 6;
pub const INVALID_CONFIG: u32 = 7;
pub const TRY_AGAIN_LATER: u32 = 11;
pub const NOT_AVAILABLE: u32 = 50;
/// The kernel refused a change or a query (the message names the netns, device and op).
pub const NETLINK: u32 = 100;
/// No free address is left in the node subnet (or in the configured range).
pub const EXHAUSTED: u32 = 101;
/// CHECK found the container's networking differing from what ADD set up.
pub const CHECK_FAILED: u32 = 102;
/// An address asked for (runtimeConfig `ips`, `CNI_ARGS` `IP=`) cannot be given.
pub const ADDRESS_UNAVAILABLE: u32 = 103;

/// A short summary of a code, for `details`.
pub fn summary(code: u32) -> &'static str {
    match code {
        INCOMPATIBLE_VERSION => "incompatible CNI version",
        UNSUPPORTED_FIELD => "unsupported field in network configuration",
        UNKNOWN_CONTAINER => "container unknown or does not exist",
        INVALID_ENV => "invalid environment variables",
        IO => "I/O failure",
        DECODE => "failed to decode content",
        INVALID_CONFIG => "invalid network configuration",
        TRY_AGAIN_LATER => "try again later",
        NOT_AVAILABLE => "plugin not available",
        NETLINK => "kernel refused a network change",
        EXHAUSTED => "no free address",
        CHECK_FAILED => "CHECK failed",
        ADDRESS_UNAVAILABLE => "requested address unavailable",
        _ => "error",
    }
}

//! The `SPANHEAP_*` environment settings, read without allocating (`getenv` and a
//! parse of the bytes in place). Its own module, below every layer that has a setting,
//! so that reading one does not tie a layer to another (the thread-cache budget in
//! `mcache` and the scavenger's settings both read theirs here).

/// The value of an environment variable, without allocating.
#[cfg(not(spanheap_loom))]
pub(crate) fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: getenv with a NUL-terminated name returns null or a pointer to a
    // NUL-terminated string in the environment, which we only read (the environment
    // is not modified concurrently by well-behaved programs; std's `set_var` has the
    // same caveat).
    unsafe {
        let v = libc::getenv(name.as_ptr());
        if v.is_null() {
            return None;
        }
        Some(core::ffi::CStr::from_ptr(v).to_bytes())
    }
}

/// The value of an environment variable as a size: decimal bytes with an optional
/// `K`, `M` or `G` suffix (binary units). None if unset or not a size. Does not
/// allocate.
#[cfg(not(spanheap_loom))]
pub(crate) fn env_size(name: &core::ffi::CStr) -> Option<usize> {
    parse_size(env(name)?)
}

/// See `env_size`.
fn parse_size(s: &[u8]) -> Option<usize> {
    let (digits, shift) = match s.last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits
        .iter()
        .fold(0u64, |v, &d| v * 10 + u64::from(d - b'0'));
    usize::try_from(v.checked_mul(1 << shift)?).ok()
}

/// A decimal `u32`, or None.
pub(crate) fn parse_u32(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 10 {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    u32::try_from(v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_settings() {
        assert_eq!(parse_u32(b"0"), Some(0));
        assert_eq!(parse_u32(b"1500"), Some(1500));
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u32(b""), None);
        assert_eq!(parse_u32(b"12ms"), None);
        assert_eq!(parse_u32(b"-1"), None);
    }

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size(b"4096"), Some(4096));
        assert_eq!(parse_size(b"64M"), Some(64 << 20));
        assert_eq!(parse_size(b"2g"), Some(2 << 30));
        assert_eq!(parse_size(b"512K"), Some(512 << 10));
        assert_eq!(parse_size(b"M"), None);
        assert_eq!(parse_size(b"1.5M"), None);
        assert_eq!(parse_size(b""), None);
    }
}

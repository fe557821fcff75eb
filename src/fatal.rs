//! Fatal reports: a misuse the allocator catches (a double free, a free of a pointer
//! that is not the start of a live block) is written to stderr as one line naming
//! spanheap, the fault and the address, then the process aborts. Going on would hand
//! the same memory out twice or free a block its owner still uses.
//!
//! Nothing here allocates or panics: the line is formatted into a buffer on the stack.

use core::fmt::{self, Write};

/// Writes `spanheap: <args>` and a newline to stderr, then aborts.
#[cold]
#[inline(never)]
pub(crate) fn fatal(args: fmt::Arguments<'_>) -> ! {
    let mut line = Line {
        buf: [0; 320],
        len: 0,
    };
    let _ = line.write_str("spanheap: ");
    let _ = line.write_fmt(args);
    // The text was cut one byte short of the buffer: the newline always fits.
    if let Some(b) = line.buf.get_mut(line.len) {
        *b = b'\n';
        line.len += 1;
    }
    // Under loom a model that reaches a fault fails like any other assertion (a
    // mutant's test expects a panic it can catch, not the end of the process).
    #[cfg(spanheap_loom)]
    panic!(
        "{}",
        core::str::from_utf8(&line.buf[..line.len]).unwrap_or("fault")
    );
    #[cfg(not(spanheap_loom))]
    {
        crate::os::write_stderr(&line.buf[..line.len]);
        // SAFETY: abort has no preconditions; it does not return.
        unsafe { libc::abort() }
    }
}

/// The small object at `addr` (of `size` bytes) was found already free when a free
/// returned it to its span.
#[cold]
#[inline(never)]
pub(crate) fn double_free(addr: usize, size: usize) -> ! {
    fatal(format_args!(
        "double free of {addr:#x} (a small object of {size} bytes)"
    ))
}

/// A stack buffer for the report (no allocation); the text is truncated one byte short
/// of its end, keeping room for the newline.
struct Line {
    buf: [u8; 320],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

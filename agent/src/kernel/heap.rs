//! Giving freed heap memory back to the kernel.

/// Returns the memory glibc's allocator keeps after frees to the kernel (every arena,
/// not only the top of the main one, which is all glibc trims by itself). Called after
/// start-up, after a /metrics scrape (at most once a second) and after each alert round:
/// measured with `cargo xtask bench idle` and `bench metrics`, the agent's RSS with no
/// targets went from 13.8 to 10.9 MiB after start (loading the programs parses the
/// kernel's BTF), and 20 scrapes with 10,000 UIDs took it from 10.9 to 17-20 MiB instead
/// of from 13.8 to 45 (then each scrape built its 3.6 MiB body on one thread and its stats
/// on another, so their freed memory sat in two arenas). No crate wraps `malloc_trim`, and
/// nix does not. musl (the packaged static builds) has no `malloc_trim`: there this does
/// nothing.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own state; 0 keeps no padding.
    unsafe {
        libc::malloc_trim(0);
    }
}

//! Gives heap memory freed at start-up back to the operating system.
//!
//! Opening a large database makes sled allocate a great deal while it
//! recovers (about 70 MiB of it freed again for a 4 GB data dir). glibc
//! keeps freed memory in its arenas and returns only what sits at the top of
//! each heap, so without a trim the process would carry that memory for its
//! whole life. Other allocators and platforms: nothing to do.

/// Returns the free memory of every glibc arena to the OS.
#[allow(unsafe_code)]
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers; it only walks glibc's own
        // free lists (under their locks) and may be called at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

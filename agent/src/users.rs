//! User database look-ups through libc, so NSS sources (LDAP, sssd) resolve like `id` does.

use std::{ffi::CString, io, mem::MaybeUninit, ptr};

/// The UID of user `name`, `None` if there is no such user.
pub fn uid_by_name(name: &str) -> io::Result<Option<u32>> {
    let c_name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 4096];
    loop {
        let mut pwd = MaybeUninit::<libc::passwd>::uninit();
        let mut result: *mut libc::passwd = ptr::null_mut();
        // SAFETY: all pointers are valid for the call; `buf` outlives it.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                pwd.as_mut_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        match rc {
            0 if result.is_null() => return Ok(None),
            // SAFETY: getpwnam_r filled `pwd` and pointed `result` at it.
            0 => return Ok(Some(unsafe { pwd.assume_init() }.pw_uid)),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            // Some NSS modules report "not found" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            errno => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

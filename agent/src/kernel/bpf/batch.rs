//! Reading a whole hash map in a few system calls, with `BPF_MAP_LOOKUP_BATCH`.
//!
//! aya 0.14 reads a map one entry at a time: a `BPF_MAP_GET_NEXT_KEY` and a
//! `BPF_MAP_LOOKUP_ELEM` per key, so a stats round over 10,000 UIDs made some 20,000
//! system calls; reading in batches took a /metrics scrape of the static build from
//! 80-84 to 53-58 ms in one run (docs/benchmarks.md, "/metrics: maps read in batches").
//! The kernel has had a batch lookup for hash maps since Linux 5.6; aya 0.14 has no
//! wrapper for it, so this is one call, on the map's descriptor, with aya-obj's generated
//! `bpf_attr`. Where the kernel refuses the command for a map, [`read_all`] says so and
//! the caller iterates as before.

use std::{
    mem::{self, MaybeUninit},
    os::fd::{AsFd, AsRawFd},
};

use std::borrow::Borrow;

use aya::{
    maps::{HashMap, IterableMap, MapData},
    Pod,
};
use aya_obj::generated::{bpf_attr__bindgen_ty_3 as BatchAttr, bpf_cmd};
use nix::errno::Errno;

/// Entries asked for per call at first. A call that meets a hash bucket with more entries
/// than it has room for returns none (ENOSPC), and the next one asks for twice as many.
const FIRST_CHUNK: usize = 4096;
/// ENOTSUPP, the kernel's "not supported" (not in libc: it is internal to the kernel, but
/// `bpf()` returns it for map types without batch operations).
const ENOTSUPP: i32 = 524;

/// `bpf(cmd, attr)` with one member of `union bpf_attr`, passed with its own size (the
/// kernel zeroes the rest of the union).
///
/// # Safety
/// `A` must be the member `cmd` reads, and every pointer in `attr` valid for what the
/// kernel reads and writes through it during the call.
unsafe fn bpf<A>(cmd: bpf_cmd, attr: &mut A) -> libc::c_long {
    // SAFETY: the caller's contract; `attr` is a live, exclusive `A` of the size given.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut A,
            mem::size_of::<A>() as u32,
        )
    }
}

/// Every entry of the hash map `map`, in bucket order, or `None` when the kernel has no
/// batch lookup for it (the caller then iterates key by key). As with iteration, entries
/// added or removed while it reads may or may not be among them. `map` is aya's `HashMap`,
/// which checked when it was made that `K` and `V` have the map's key and value sizes:
/// the kernel writes entries at those sizes.
pub(super) fn read_all<T, K, V>(map: &HashMap<T, K, V>) -> Result<Option<Vec<(K, V)>>, Errno>
where
    T: Borrow<MapData>,
    K: Pod,
    V: Pod,
{
    read_in_chunks(map, FIRST_CHUNK)
}

/// [`read_all`], asking for `chunk` entries in the first call.
fn read_in_chunks<T, K, V>(
    map: &HashMap<T, K, V>,
    mut chunk: usize,
) -> Result<Option<Vec<(K, V)>>, Errno>
where
    T: Borrow<MapData>,
    K: Pod,
    V: Pod,
{
    let fd = map.map().fd().as_fd().as_raw_fd();
    let mut entries = Vec::new();
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // The position token: for a hash map, a bucket index (a u32, in the token's first 4
    // bytes, where the next call reads it back). `None` starts at the first bucket.
    let mut position: Option<u64> = None;
    loop {
        // Zeroed, so every entry is a valid `Pod` value whatever the kernel writes.
        keys.resize(chunk, MaybeUninit::zeroed());
        values.resize(chunk, MaybeUninit::zeroed());
        let mut next = 0u64;
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u64 as u64),
            out_batch: &mut next as *mut u64 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` is the batch member, which BPF_MAP_LOOKUP_BATCH reads. Every
        // pointer in it is to a buffer that lives across the call. The kernel writes at
        // most `count` keys and values, at the map's key and value sizes, which are `K`'s
        // and `V`'s (checked by aya's `HashMap`), into `keys` and `values`, which have
        // room for `count` of each; a hash map's next position (4 bytes) into `next` (8);
        // and the number of entries into `attr.count`.
        let ret = unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) };
        let error = (ret < 0).then(Errno::last);
        // The entries the kernel copied (0 on an error other than ENOENT).
        let copied = attr.count as usize;
        match error {
            None | Some(Errno::ENOENT) => {
                let copied = copied.min(chunk);
                entries.extend(keys[..copied].iter().zip(&values[..copied]).map(|(k, v)| {
                    // SAFETY: every slot holds initialized bytes (zeroes when it was added,
                    // else whole entries the kernel wrote); `K` and `V` are `Pod`, valid
                    // for any bytes.
                    unsafe { (k.assume_init_read(), v.assume_init_read()) }
                }));
                if error.is_some() {
                    return Ok(Some(entries));
                }
                position = Some(next);
            }
            Some(Errno::ENOSPC) => chunk *= 2,
            Some(Errno::EINVAL) if position.is_none() => return Ok(None),
            Some(e) if e as i32 == ENOTSUPP && position.is_none() => return Ok(None),
            Some(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{FromRawFd, OwnedFd};

    use aya::maps::Map;
    use aya_obj::generated::{bpf_attr__bindgen_ty_1 as CreateAttr, bpf_map_type};

    use super::*;

    /// A new BPF hash map of u32 keys and u64 values.
    fn hash_map(max_entries: u32) -> HashMap<MapData, u32, u64> {
        // SAFETY: an all-zero `CreateAttr` is valid (plain integers and a char array).
        let mut attr: CreateAttr = unsafe { mem::zeroed() };
        attr.map_type = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
        attr.key_size = 4;
        attr.value_size = 8;
        attr.max_entries = max_entries;
        // SAFETY: `attr` is the map-create member, which BPF_MAP_CREATE reads; it holds no
        // pointers.
        let fd = unsafe { bpf(bpf_cmd::BPF_MAP_CREATE, &mut attr) };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", Errno::last());
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let data = MapData::from_fd(fd).expect("the new map's info");
        HashMap::try_from(Map::HashMap(data)).expect("a hash map of u32 to u64")
    }

    #[test]
    fn a_batch_read_returns_every_entry_that_iteration_does() {
        if !crate::testing::privileged("a_batch_read_returns_every_entry_that_iteration_does") {
            return;
        }
        let mut map = hash_map(16_384);
        let empty: Vec<(u32, u64)> = read_all(&map).unwrap().expect("batch reads");
        assert!(empty.is_empty(), "an empty map reads as empty: {empty:?}");
        // More entries than the first chunk, so it takes several calls.
        for key in 0..10_000u32 {
            map.insert(key * 7, u64::from(key) << 32 | 5, 0).unwrap();
        }
        let mut iterated: Vec<(u32, u64)> = map.iter().map(Result::unwrap).collect();
        iterated.sort_unstable();
        assert_eq!(iterated.len(), 10_000);
        // From one entry per call: a bucket of two or more is refused (ENOSPC) until the
        // chunk has grown to hold it.
        for first in [FIRST_CHUNK, 1] {
            let mut batched: Vec<(u32, u64)> =
                read_in_chunks(&map, first).unwrap().expect("batch reads");
            batched.sort_unstable();
            assert_eq!(batched, iterated, "first chunk {first}");
        }
    }
}

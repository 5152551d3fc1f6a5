//! The system calls behind placement: a thread's CPU affinity (`sched_setaffinity`,
//! `sched_getaffinity`) and a buffer's memory policy (`mbind`). The only unsafe code of
//! [`crate::numa`] besides reading interface addresses.
//!
//! CPU and node masks are built at the size the ids need, not as a fixed `cpu_set_t`
//! (1024 CPUs), so that hosts with more CPUs work; ids stay below [`CPU_ID_LIMIT`].

use std::io;

use super::cpulist::CPU_ID_LIMIT;
use super::NumaError;

const WORD_BITS: usize = libc::c_ulong::BITS as usize;
/// `mbind` flag: move pages already faulted in to the new policy (not in the libc crate).
const MPOL_MF_MOVE: libc::c_uint = 1 << 1;

/// A bit mask of `bits` bits as the kernel wants it: an array of `unsigned long`.
fn mask_with(ids: &[u32], bits: usize) -> Vec<libc::c_ulong> {
    let mut words = vec![0 as libc::c_ulong; bits.div_ceil(WORD_BITS).max(1)];
    for &id in ids {
        let id = id as usize;
        words[id / WORD_BITS] |= 1 << (id % WORD_BITS);
    }
    words
}

/// Pins the calling thread to `cpus` (kernel CPU ids). Threads it starts afterwards inherit
/// the mask.
pub fn set_thread_affinity(cpus: &[u32]) -> Result<(), NumaError> {
    let fail = |source| NumaError::Affinity {
        cpus: super::format_cpu_list(cpus),
        source,
    };
    if cpus.is_empty() {
        return Err(fail(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    if let Some(&cpu) = cpus.iter().find(|&&cpu| cpu >= CPU_ID_LIMIT) {
        return Err(NumaError::CpuList {
            list: super::format_cpu_list(cpus),
            reason: format!("CPU {cpu} is beyond the largest CPU id"),
        });
    }
    let highest = *cpus.iter().max().expect("not empty") as usize;
    let mask = mask_with(cpus, highest + 1);
    // SAFETY: `mask` is a live, initialized buffer of exactly `size_of_val(mask)` bytes,
    // which is what the kernel reads; pid 0 is the calling thread; the kernel keeps no
    // pointer to the buffer after the call.
    let rc = unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of_val(mask.as_slice()),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(fail(io::Error::last_os_error()))
    }
}

/// The CPUs the calling thread may run on, sorted (empty if the kernel will not say, which
/// does not happen on Linux short of a mask wider than [`CPU_ID_LIMIT`]).
pub fn thread_affinity() -> Vec<u32> {
    // Start at the usual cpu_set_t size and double while the kernel's mask is wider
    // (EINVAL), up to the id limit.
    let mut bits = 1024;
    loop {
        let mut mask = vec![0 as libc::c_ulong; bits / WORD_BITS];
        // SAFETY: `mask` is a live buffer of exactly `size_of_val(mask)` writable bytes,
        // the size the kernel is told; pid 0 is the calling thread. The kernel writes at
        // most that many bytes and keeps no pointer to the buffer.
        let rc = unsafe {
            libc::sched_getaffinity(
                0,
                std::mem::size_of_val(mask.as_slice()),
                mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
            )
        };
        if rc == 0 {
            return (0..bits)
                .filter(|&cpu| mask[cpu / WORD_BITS] & (1 << (cpu % WORD_BITS)) != 0)
                .map(|cpu| cpu as u32)
                .collect();
        }
        let einval = io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL);
        if !einval || bits >= CPU_ID_LIMIT as usize {
            return Vec::new();
        }
        bits *= 2;
    }
}

/// Asks the kernel to place the pages of `[ptr, ptr + len)` on NUMA node `node`
/// (`MPOL_PREFERRED`: other nodes when that one is full, rather than the OOM killer that
/// `MPOL_BIND` would risk), moving pages already there (`MPOL_MF_MOVE`). The range is
/// widened to whole pages. For a shared memfd mapping (guest memory) the policy belongs
/// to the file, so every process mapping it gets pages on that node.
///
/// Safe to call on any range: `mbind` changes where pages live, never their contents, and
/// fails (`EFAULT`/`ENOMEM`) on addresses that are not mapped.
pub fn bind_memory(ptr: *mut u8, len: usize, node: u32) -> Result<(), NumaError> {
    let fail = |source| NumaError::Bind { node, len, source };
    if len == 0 {
        return Ok(());
    }
    if node >= CPU_ID_LIMIT {
        return Err(fail(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let page = crate::PAGE_SIZE;
    let start = (ptr as usize) & !(page - 1);
    let end = (ptr as usize)
        .checked_add(len)
        .ok_or_else(|| fail(io::Error::from_raw_os_error(libc::EINVAL)))?
        .next_multiple_of(page);
    let bits = node as usize + 1;
    let nodemask = mask_with(&[node], bits);
    // SAFETY: mbind reads `nodemask` (live, `bits` bits long, within its allocation) and
    // changes the memory policy of the pages in [start, end); it neither reads nor writes
    // their contents nor keeps a pointer to the mask, so no Rust reference is affected.
    // `maxnode` is one more than the bits passed: the kernel drops the last bit
    // (mbind(2), "maxnode").
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            start as *mut libc::c_void,
            (end - start) as libc::c_ulong,
            libc::MPOL_PREFERRED as libc::c_ulong,
            nodemask.as_ptr(),
            (bits + 1) as libc::c_ulong,
            MPOL_MF_MOVE as libc::c_ulong,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(fail(io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous private mapping of `len` bytes, unmapped on drop.
    struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing
            // aliases nothing.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            Self {
                ptr: ptr.cast(),
                len,
            }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: the mapping was created by Mapping::new with this length and no
            // reference into it outlives the Mapping.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// The memory policy mode of the page at `addr` (get_mempolicy with MPOL_F_ADDR).
    fn policy_at(addr: *mut u8) -> i32 {
        const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
        let mut mode: libc::c_int = -1;
        // SAFETY: `mode` is a live int the kernel writes; a null nodemask with maxnode 0
        // asks for the mode only; `addr` is only used to look the policy up.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_get_mempolicy,
                &mut mode as *mut libc::c_int,
                std::ptr::null_mut::<libc::c_ulong>(),
                0 as libc::c_ulong,
                addr as *mut libc::c_void,
                MPOL_F_ADDR,
            )
        };
        assert_eq!(rc, 0, "get_mempolicy: {}", io::Error::last_os_error());
        mode
    }

    #[test]
    fn numa_affinity_pins_and_reads_back_in_a_thread() {
        let allowed = thread_affinity();
        assert!(!allowed.is_empty());
        let first = allowed[0];
        // In a thread of its own: the test harness's thread keeps its mask.
        let seen = std::thread::spawn(move || {
            set_thread_affinity(&[first]).unwrap();
            thread_affinity()
        })
        .join()
        .unwrap();
        assert_eq!(seen, vec![first]);
    }

    #[test]
    fn numa_affinity_refuses_empty_and_impossible_sets() {
        let err = set_thread_affinity(&[]).unwrap_err();
        assert!(matches!(err, NumaError::Affinity { .. }), "{err}");
        // CPU 4095 does not exist here: the kernel refuses a mask with no usable CPU.
        let err = std::thread::spawn(|| set_thread_affinity(&[4095]))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("4095"), "{err}");
    }

    #[test]
    fn numa_bind_memory_sets_the_preferred_policy() {
        let mapping = Mapping::new(4 * crate::PAGE_SIZE);
        // Unaligned start and length: widened to whole pages.
        // SAFETY: offset 100 is inside the mapping.
        let inside = unsafe { mapping.ptr.add(100) };
        bind_memory(inside, 2 * crate::PAGE_SIZE, 0).unwrap();
        assert_eq!(policy_at(mapping.ptr), libc::MPOL_PREFERRED);
        // A node that does not exist is refused.
        let err = bind_memory(mapping.ptr, crate::PAGE_SIZE, 1000).unwrap_err();
        assert!(matches!(err, NumaError::Bind { node: 1000, .. }), "{err}");
        bind_memory(mapping.ptr, 0, 0).unwrap();
    }
}

//! The allocator's memory policy for a long-running stage: memory freed is
//! kept for reuse, not handed back to the operating system.
//!
//! mimalloc (the binary's allocator, see `main.rs`) returns freed memory to
//! the OS a delay after it is freed (a second by default), but the delay is
//! kept per arena: when it runs out, every range freed since is returned at
//! once, including pages freed a moment ago. A stage frees and allocates
//! the same few megabytes every batch (records, packets, librdkafka's
//! copies and its decompressed fetches), so much of what it allocates came
//! back as a fresh page: a page fault, the kernel zeroing the page, and
//! the `madvise` that returned it shooting down both cores' TLBs. In the
//! route step of the pipeline bench page faults were 3.7% of all samples;
//! with the returns off the stage spent 25.1 µs of CPU per action instead
//! of 26.9 (six alternating pairs, the step shorter in five).
//!
//! The price: a process keeps the resident size of its busiest moment. So
//! only a process running the route stage alone does this (`switchboard
//! run --stage route`): the escalation stage restores every pending
//! approval whenever it gets partitions, and keeping that restore's peak
//! (about 850 MiB for a million approvals in the pipeline bench, against
//! about 380 MiB once the peak is returned) would cost more than the faults
//! it saves. An operator who wants otherwise sets `MIMALLOC_PURGE_DELAY`
//! (milliseconds), which is then left alone.

/// `mi_option_purge_delay`: its place in mimalloc.h's `mi_option_e` (the
/// Rust bindings name no constant for it). The test checks it is the option
/// whose default is mimalloc's 1000 ms purge delay.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Switches mimalloc's returns off unless the operator chose a delay;
/// says whether it did. Called before the route stage starts, by `run`
/// (the route stage alone) and by the pipeline bench (which runs the route
/// stage in its own process).
pub fn keep_freed_memory() -> bool {
    let chosen = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if chosen {
        return false;
    }
    // SAFETY: mi_option_set stores one option value (atomically); mimalloc
    // reads options on every decision, so it may be called at any time from
    // any thread. -1 means "never purge" (mimalloc.h, mi_option_purge_delay).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
    true
}

/// mimalloc's current purge delay in milliseconds (-1: never).
pub fn purge_delay() -> std::ffi::c_long {
    // SAFETY: reads one option value; callable at any time.
    unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_are_switched_off_unless_the_operator_chose() {
        // The test process has no MIMALLOC_* settings of its own (CI sets none).
        let operator_chose = std::env::var_os("MIMALLOC_PURGE_DELAY").is_some()
            || std::env::var_os("MIMALLOC_RESET_DELAY").is_some();
        if !operator_chose {
            assert_eq!(
                purge_delay(),
                1000,
                "mimalloc's default purge delay: the option is the one meant"
            );
        }
        assert_eq!(keep_freed_memory(), !operator_chose);
        if !operator_chose {
            assert_eq!(purge_delay(), -1);
        }
    }
}

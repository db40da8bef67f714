//! Windows aligned to the wall clock: boundaries fall on multiples of the window's length
//! since the Unix epoch, so that the windows of every agent and every processor line up, and
//! a processor's output of one window can be compared with another's.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Windows {
    length: u64,
    /// End of the current window, in Unix nanoseconds, and when it is due.
    end: u64,
    deadline: Instant,
}

impl Windows {
    /// Windows of `length` (at least 1 ns), the current one containing now.
    pub fn new(length: Duration) -> Self {
        let length = duration_nanos(length).max(1);
        let end = next_boundary(now_unix_nanos(), length);
        Self {
            length,
            end,
            deadline: instant_at(end),
        }
    }

    /// When the current window ends.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Closes the current window and returns its end, in Unix nanoseconds. The next window
    /// is the one containing now, or the one right after the closed one: never earlier, even
    /// if the wall clock stepped back.
    pub fn advance(&mut self) -> u64 {
        let closed = self.end;
        self.end =
            next_boundary(now_unix_nanos(), self.length).max(closed.saturating_add(self.length));
        self.deadline = instant_at(self.end);
        closed
    }
}

pub fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, duration_nanos)
}

/// The first multiple of `length` after `now`.
fn next_boundary(now: u64, length: u64) -> u64 {
    (now / length).saturating_add(1).saturating_mul(length)
}

/// When the monotonic clock reaches the wall-clock time `unix` (now, if that has passed).
fn instant_at(unix: u64) -> Instant {
    Instant::now() + Duration::from_nanos(unix.saturating_sub(now_unix_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_are_multiples_of_the_length_and_only_move_forward() {
        let mut windows = Windows::new(Duration::from_secs(10));
        let first = windows.advance();
        assert_eq!(first % 10_000_000_000, 0);
        assert!(first > now_unix_nanos() - 10_000_000_000);
        let second = windows.advance();
        assert_eq!(second, first + 10_000_000_000);
        assert!(windows.deadline() > Instant::now());
        assert_eq!(next_boundary(25, 10), 30);
        assert_eq!(next_boundary(30, 10), 40);
    }
}

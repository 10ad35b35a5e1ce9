//! Values from the master checked before they are used: a duration or a
//! size no real master sends (1e300 seconds, a negative or non-finite
//! number) refuses the message it came in, with a reason, instead of
//! panicking in a `Duration` conversion or holding a core for ever.

use drover_protocol::RunTask;

/// The longest wall time or keepalive interval taken from the wire: a
/// year, far beyond any real one, far within what a `Duration` holds.
pub(crate) const MAX_WIRE_SECONDS: f64 = 365.0 * 86_400.0;

/// A number of seconds from the master: finite, positive, at most
/// [`MAX_WIRE_SECONDS`]. `what` names it in the error.
pub(crate) fn seconds(what: &str, s: f64) -> Result<f64, String> {
    if s.is_finite() && s > 0.0 && s <= MAX_WIRE_SECONDS {
        Ok(s)
    } else {
        Err(format!(
            "{what} of {s} s from the master is not a number of seconds from 0 to {MAX_WIRE_SECONDS}"
        ))
    }
}

/// Checks the numbers of a task the master sent, before it is admitted.
pub(crate) fn run_task(task: &RunTask) -> Result<(), String> {
    if let Some(s) = task.wall_time_s {
        seconds("a wall time", s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_seconds_are_refused_with_a_reason() {
        for bad in [1e300, f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let e = seconds("a wall time", bad).unwrap_err();
            assert!(e.contains("a wall time of"), "{e}");
        }
        assert_eq!(seconds("x", 2.5), Ok(2.5));
    }

    #[test]
    fn a_task_with_an_absurd_wall_time_is_refused() {
        let task = |s: f64| -> RunTask {
            serde_json::from_value(serde_json::json!({
                "task_id": 1, "attempt": 1, "command": "true", "wall_time_s": s,
                "allocation": {"cores": 1, "memory_mb": 0, "disk_mb": 0, "gpus": 0}
            }))
            .expect("a run message")
        };
        assert!(run_task(&task(1e300)).is_err());
        assert!(run_task(&task(-3.0)).is_err());
        assert!(run_task(&task(60.0)).is_ok());
    }
}

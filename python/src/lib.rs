//! `drover._drover`: the compiled half of the `drover` Python package.
//!
//! It wraps the blocking [`drover_master::Manager`] (whose network work runs
//! on its own tokio runtime, so Python threads only ever block in `wait`,
//! with the GIL released) and [`drover_monitor`] for `drover.monitored`.
//! Everything that is easier in Python (PythonTask, the Parsl executor,
//! local workers) lives in the pure-Python package around this module.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod monitored;

/// As in the `drover` binary: the master allocates and frees per task (frames, reports, results) on
/// several threads; mimalloc's per-thread free lists cost 6-14% less master
/// CPU per task than glibc's malloc at 1M tasks x 1,000 workers
/// (benches/README, issue 22 round 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use drover_master::{CategoryConfig, Manager, SubmitError, Task, TaskResult};
use drover_monitor::{Exit, Limits, Monitor, MonitorOptions};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyFileNotFoundError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

create_exception!(
    _drover,
    DroverError,
    PyException,
    "Base class of errors raised by drover itself."
);

/// How long `wait` sleeps with the GIL released before it looks for a
/// pending signal: short enough that Ctrl-C feels immediate.
const SIGNAL_SLICE: Duration = Duration::from_millis(100);

fn to_py<T: serde::Serialize>(py: Python<'_>, value: &T) -> PyResult<PyObject> {
    pythonize::pythonize(py, value)
        .map(|b| b.unbind())
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

fn seconds(limit: f64, what: &str) -> PyResult<Duration> {
    Duration::try_from_secs_f64(limit).map_err(|_| {
        PyValueError::new_err(format!(
            "{what} must be a non-negative number of seconds, got {limit}"
        ))
    })
}

fn epoch(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// An input given as `path`, `(path, remote)` or `(path, remote, cache)`.
fn parse_input(item: &Bound<'_, PyAny>) -> PyResult<(PathBuf, Option<String>, bool)> {
    if let Ok(path) = item.extract::<PathBuf>() {
        return Ok((path, None, true));
    }
    if let Ok((path, remote)) = item.extract::<(PathBuf, Option<String>)>() {
        return Ok((path, remote, true));
    }
    if let Ok((path, remote, cache)) = item.extract::<(PathBuf, Option<String>, bool)>() {
        return Ok((path, remote, cache));
    }
    Err(PyValueError::new_err(format!(
        "an input is a path, (path, remote_name) or (path, remote_name, cache), not {item}"
    )))
}

/// The sandbox name of a local file given without one: its base name.
fn base_name(path: &std::path::Path) -> PyResult<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "cannot derive a remote name from {}; give one",
                path.display()
            ))
        })
}

/// A command to run on a worker, with its files and resources.
///
/// Options can be given as keyword arguments or set afterwards with the
/// `add_*` / `set_*` methods, which return the task so calls chain.
#[pyclass(subclass, module = "drover._drover", name = "Task")]
#[derive(Clone)]
struct PyTask {
    inner: Task,
    tag: Option<String>,
    category: Option<String>,
    priority: i32,
    resources: drover_master::Resources,
    /// Whether submitting reads or removes files (inputs, outputs, a
    /// packaged environment): only then is the GIL released for submit.
    touches_files: bool,
}

impl PyTask {
    fn update(&mut self, f: impl FnOnce(Task) -> Task) {
        self.inner = f(std::mem::take(&mut self.inner));
    }

    fn add_input(&mut self, path: PathBuf, remote: Option<String>, cache: bool) -> PyResult<()> {
        let remote = match remote {
            Some(r) => r,
            None => base_name(&path)?,
        };
        self.touches_files = true;
        self.update(|t| t.input_file(path, remote, cache));
        Ok(())
    }

    fn add_output(&mut self, local: PathBuf, remote: Option<String>) -> PyResult<()> {
        let remote = match remote {
            Some(r) => r,
            None => base_name(&local)?,
        };
        self.touches_files = true;
        self.update(|t| t.output_file(remote, local));
        Ok(())
    }
}

#[pymethods]
impl PyTask {
    #[new]
    #[pyo3(signature = (command, *, inputs=None, outputs=None, buffers=None, env=None, cores=None,
        memory=None, disk=None, gpus=None, wall_time=None, category=None, tag=None, priority=None,
        max_retries=None, environment=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        command: String,
        inputs: Option<Vec<Bound<'_, PyAny>>>,
        outputs: Option<Vec<Bound<'_, PyAny>>>,
        buffers: Option<std::collections::BTreeMap<String, Vec<u8>>>,
        env: Option<std::collections::BTreeMap<String, String>>,
        cores: Option<u32>,
        memory: Option<u64>,
        disk: Option<u64>,
        gpus: Option<u32>,
        wall_time: Option<f64>,
        category: Option<String>,
        tag: Option<String>,
        priority: Option<i32>,
        max_retries: Option<u32>,
        environment: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut t = PyTask {
            inner: Task::new(command),
            tag: None,
            category: None,
            priority: 0,
            resources: Default::default(),
            touches_files: false,
        };
        for item in inputs.unwrap_or_default() {
            let (path, remote, cache) = parse_input(&item)?;
            t.add_input(path, remote, cache)?;
        }
        for item in outputs.unwrap_or_default() {
            let (local, remote) = if let Ok(p) = item.extract::<PathBuf>() {
                (p, None)
            } else if let Ok((p, r)) = item.extract::<(PathBuf, Option<String>)>() {
                (p, r)
            } else {
                return Err(PyValueError::new_err(format!(
                    "an output is a local path or (local_path, remote_name), not {item}"
                )));
            };
            t.add_output(local, remote)?;
        }
        for (remote, bytes) in buffers.unwrap_or_default() {
            t.update(|task| task.input_buffer(bytes, remote));
        }
        for (k, v) in env.unwrap_or_default() {
            t.update(|task| task.env(k, v));
        }
        if let Some(c) = cores {
            t.resources.cores = c;
            t.update(|task| task.cores(c));
        }
        if let Some(m) = memory {
            t.resources.memory_mb = m;
            t.update(|task| task.memory_mb(m));
        }
        if let Some(d) = disk {
            t.resources.disk_mb = d;
            t.update(|task| task.disk_mb(d));
        }
        if let Some(g) = gpus {
            t.resources.gpus = g;
            t.update(|task| task.gpus(g));
        }
        if let Some(w) = wall_time {
            let d = seconds(w, "wall_time")?;
            t.update(|task| task.wall_time(d));
        }
        if let Some(c) = category {
            t.category = Some(c.clone());
            t.update(|task| task.category(c));
        }
        if let Some(tag) = tag {
            t.tag = Some(tag.clone());
            t.update(|task| task.tag(tag));
        }
        if let Some(p) = priority {
            t.priority = p;
            t.update(|task| task.priority(p));
        }
        if let Some(r) = max_retries {
            t.update(|task| task.max_retries(r));
        }
        if let Some(e) = environment {
            t.touches_files = true;
            t.update(|task| task.environment(e));
        }
        Ok(t)
    }

    /// The command line, run under `/bin/sh -c` in the task's sandbox.
    #[getter]
    fn command(&self) -> &str {
        self.inner.command()
    }

    /// The tag, if any.
    #[getter]
    fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The category, if any (tasks without one are in "default").
    #[getter]
    fn category(&self) -> Option<&str> {
        self.category.as_deref()
    }

    /// The priority (higher runs first).
    #[getter]
    fn priority(&self) -> i32 {
        self.priority
    }

    /// The requested resources: dict of cores, memory_mb, disk_mb, gpus (0 means unspecified).
    #[getter]
    fn resources(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.resources)
    }

    /// Sends the local file `local` to the sandbox as `remote` (default: its
    /// base name). A `cache`d file stays on the worker, keyed by content, and
    /// crosses the network once per worker.
    #[pyo3(signature = (local, remote=None, cache=true))]
    fn add_input_file(
        mut slf: PyRefMut<'_, Self>,
        local: PathBuf,
        remote: Option<String>,
        cache: bool,
    ) -> PyResult<PyRefMut<'_, Self>> {
        slf.add_input(local, remote, cache)?;
        Ok(slf)
    }

    /// Writes `data` into the sandbox as the file `remote`.
    fn add_input_buffer(
        mut slf: PyRefMut<'_, Self>,
        data: Vec<u8>,
        remote: String,
    ) -> PyRefMut<'_, Self> {
        slf.update(|t| t.input_buffer(data, remote));
        slf
    }

    /// Brings the sandbox file `remote` (default: the base name of `local`)
    /// back to the local path `local` when the task ends.
    #[pyo3(signature = (local, remote=None))]
    fn add_output_file(
        mut slf: PyRefMut<'_, Self>,
        local: PathBuf,
        remote: Option<String>,
    ) -> PyResult<PyRefMut<'_, Self>> {
        slf.add_output(local, remote)?;
        Ok(slf)
    }

    /// Sets an environment variable for the command.
    fn set_env(mut slf: PyRefMut<'_, Self>, name: String, value: String) -> PyRefMut<'_, Self> {
        slf.update(|t| t.env(name, value));
        slf
    }

    /// Whole cores to reserve.
    fn set_cores(mut slf: PyRefMut<'_, Self>, cores: u32) -> PyRefMut<'_, Self> {
        slf.resources.cores = cores;
        slf.update(|t| t.cores(cores));
        slf
    }

    /// Memory to reserve, MB; the task is killed if it uses more.
    fn set_memory(mut slf: PyRefMut<'_, Self>, mb: u64) -> PyRefMut<'_, Self> {
        slf.resources.memory_mb = mb;
        slf.update(|t| t.memory_mb(mb));
        slf
    }

    /// Sandbox disk to reserve, MB; the task is killed if it uses more.
    fn set_disk(mut slf: PyRefMut<'_, Self>, mb: u64) -> PyRefMut<'_, Self> {
        slf.resources.disk_mb = mb;
        slf.update(|t| t.disk_mb(mb));
        slf
    }

    /// GPUs to reserve; the task sees their ids in CUDA_VISIBLE_DEVICES.
    fn set_gpus(mut slf: PyRefMut<'_, Self>, gpus: u32) -> PyRefMut<'_, Self> {
        slf.resources.gpus = gpus;
        slf.update(|t| t.gpus(gpus));
        slf
    }

    /// Kill the task if it runs longer than `seconds`.
    fn set_wall_time(mut slf: PyRefMut<'_, Self>, seconds_: f64) -> PyResult<PyRefMut<'_, Self>> {
        let d = seconds(seconds_, "wall_time")?;
        slf.update(|t| t.wall_time(d));
        Ok(slf)
    }

    /// The category whose resource measurements this task shares.
    fn set_category(mut slf: PyRefMut<'_, Self>, category: String) -> PyRefMut<'_, Self> {
        slf.category = Some(category.clone());
        slf.update(|t| t.category(category));
        slf
    }

    /// A label to find and cancel the task by.
    fn set_tag(mut slf: PyRefMut<'_, Self>, tag: String) -> PyRefMut<'_, Self> {
        slf.tag = Some(tag.clone());
        slf.update(|t| t.tag(tag));
        slf
    }

    /// Higher runs first; equal priorities run in submission order.
    fn set_priority(mut slf: PyRefMut<'_, Self>, priority: i32) -> PyRefMut<'_, Self> {
        slf.priority = priority;
        slf.update(|t| t.priority(priority));
        slf
    }

    /// Times the task is run again after its worker is lost (default 5).
    fn set_max_retries(mut slf: PyRefMut<'_, Self>, retries: u32) -> PyRefMut<'_, Self> {
        slf.update(|t| t.max_retries(retries));
        slf
    }

    /// Makes the task a Python function call: `payload` is
    /// `cloudpickle.dumps((fn, args, kwargs))`, run by the worker's function
    /// server after importing `modules`; the pickled outcome comes back as
    /// the result's `call_result`. Used by `drover.PythonTask`.
    fn set_function_call<'py>(
        mut slf: PyRefMut<'py, Self>,
        payload: &[u8],
        modules: Vec<String>,
    ) -> PyRefMut<'py, Self> {
        let payload: std::sync::Arc<[u8]> = payload.into();
        slf.update(|t| t.function_call(payload, modules));
        slf
    }

    /// A packaged environment (from `drover pack create`) to run the command in.
    fn set_environment(mut slf: PyRefMut<'_, Self>, tarball: PathBuf) -> PyRefMut<'_, Self> {
        slf.touches_files = true;
        slf.update(|t| t.environment(tarball));
        slf
    }

    fn __repr__(&self) -> String {
        format!("Task({:?})", self.inner.command())
    }
}

/// Everything known about a finished task.
#[pyclass(frozen, module = "drover._drover", name = "TaskResult")]
struct PyTaskResult {
    inner: TaskResult,
    /// The call's pickled outcome, moved out of `inner` into Python bytes
    /// once: a result of many MB is then held once, not twice.
    call_result: Option<Py<PyBytes>>,
}

impl PyTaskResult {
    fn new(py: Python<'_>, mut inner: TaskResult) -> PyTaskResult {
        let call_result = inner
            .call_result
            .take()
            .map(|b| PyBytes::new(py, &b).unbind());
        PyTaskResult { inner, call_result }
    }
}

#[pymethods]
impl PyTaskResult {
    /// The id `submit` returned.
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id
    }
    #[getter]
    fn tag(&self) -> Option<&str> {
        self.inner.tag.as_deref()
    }
    #[getter]
    fn category(&self) -> &str {
        &self.inner.category
    }
    #[getter]
    fn command(&self) -> &str {
        &self.inner.command
    }
    /// How the task ended: "success", "failed", "input_missing",
    /// "output_missing", "resource_exhausted", "wall_time_exceeded",
    /// "worker_lost" or "cancelled".
    #[getter]
    fn outcome(&self) -> String {
        serde_json::to_value(&self.inner.outcome)
            .ok()
            .and_then(|v| v.get("outcome").and_then(|o| o.as_str()).map(String::from))
            .unwrap_or_else(|| format!("{:?}", self.inner.outcome))
    }
    /// A function call's pickled outcome (`("ok", value)` or `("err", ...)`),
    /// or None.
    #[getter]
    fn call_result<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.call_result.as_ref().map(|b| b.bind(py).clone())
    }

    /// For outcome "resource_exhausted": which resource ran out.
    #[getter]
    fn exhausted_resource(&self) -> Option<String> {
        serde_json::to_value(&self.inner.outcome)
            .ok()
            .and_then(|v| v.get("resource").and_then(|o| o.as_str()).map(String::from))
    }
    /// True when the outcome is "success".
    #[getter]
    fn succeeded(&self) -> bool {
        self.inner.succeeded()
    }
    /// The command's exit code (None if it did not exit normally or never ran).
    #[getter]
    fn exit_code(&self) -> Option<i32> {
        self.inner.exit_code
    }
    /// The signal that killed the command, if one did.
    #[getter]
    fn signal(&self) -> Option<i32> {
        self.inner.signal
    }
    #[getter]
    fn stdout(&self) -> &str {
        &self.inner.stdout
    }
    #[getter]
    fn stderr(&self) -> &str {
        &self.inner.stderr
    }
    /// What went wrong outside the command, if anything did.
    #[getter]
    fn error(&self) -> Option<&str> {
        self.inner.error.as_deref()
    }
    /// The resources the last attempt ran in: dict of cores, memory_mb, disk_mb, gpus.
    #[getter]
    fn allocated(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.allocated)
    }
    /// What the task used: wall_time_s, cpu_time_s, memory_mb (peak), disk_mb,
    /// cores (average) and the monitor's full summary when there is one.
    #[getter]
    fn measured(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.measured)
    }
    /// Every attempt in order: dicts of host, allocation and ending.
    #[getter]
    fn attempts(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner.attempts)
    }
    /// Host of the worker that ran the last attempt.
    #[getter]
    fn host(&self) -> Option<&str> {
        self.inner.host.as_deref()
    }
    /// Submission time, seconds since the epoch.
    #[getter]
    fn submitted(&self) -> f64 {
        epoch(self.inner.submitted)
    }
    /// Start time of the last attempt, seconds since the epoch.
    #[getter]
    fn started(&self) -> Option<f64> {
        self.inner.started.map(epoch)
    }
    /// Time the result came back, seconds since the epoch.
    #[getter]
    fn finished(&self) -> f64 {
        epoch(self.inner.finished)
    }
    /// The whole result as a dict (JSON-compatible).
    fn to_dict(&self, py: Python<'_>) -> PyResult<PyObject> {
        to_py(py, &self.inner)
    }
    fn __repr__(&self) -> String {
        format!(
            "TaskResult(id={}, outcome={:?}, exit_code={:?})",
            self.inner.id,
            self.outcome(),
            self.inner.exit_code
        )
    }
}

/// The [`Manager`] that Python threads share (`Manager` is `Send + Sync`).
struct SharedManager(Manager);

impl SharedManager {
    // A method, not `.0`, so closures capture the whole (Sync) wrapper.
    fn m(&self) -> &Manager {
        &self.0
    }
}

/// The compiled master. Use `drover.Manager`, which adds Python tasks.
#[pyclass(module = "drover._drover", name = "Manager")]
struct PyManager {
    inner: Option<SharedManager>,
    name: Option<String>,
}

impl PyManager {
    fn get(&self) -> PyResult<&SharedManager> {
        self.inner
            .as_ref()
            .ok_or_else(|| DroverError::new_err("the manager has shut down"))
    }
}

#[pymethods]
impl PyManager {
    #[new]
    #[pyo3(signature = (port=0, name=None, password_file=None, catalog=None, bind="0.0.0.0".to_string(),
        keepalive_interval=10.0, keepalive_timeout=60.0, catalog_interval=15.0, tls_cert=None,
        tls_key=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        port: u16,
        name: Option<String>,
        password_file: Option<PathBuf>,
        catalog: Option<String>,
        bind: String,
        keepalive_interval: f64,
        keepalive_timeout: f64,
        catalog_interval: f64,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
    ) -> PyResult<Self> {
        let mut b = Manager::builder().port(port).bind(bind).keepalive(
            seconds(keepalive_interval, "keepalive_interval")?,
            seconds(keepalive_timeout, "keepalive_timeout")?,
        );
        if let Some(n) = &name {
            b = b.project(n.clone());
        }
        if let Some(p) = password_file {
            b = b.password_file(p);
        }
        match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => b = b.tls(cert, key),
            (None, None) => {}
            _ => {
                return Err(DroverError::new_err(
                    "tls_cert and tls_key go together (drover tls init makes both)",
                ))
            }
        }
        if let Some(c) = catalog {
            b = b
                .catalog(c)
                .catalog_interval(seconds(catalog_interval, "catalog_interval")?);
        }
        let m = py
            .allow_threads(|| b.build())
            .map_err(|e| DroverError::new_err(e.to_string()))?;
        Ok(PyManager {
            inner: Some(SharedManager(m)),
            name,
        })
    }

    /// The port workers connect to.
    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.get()?.m().port())
    }

    /// The project name, if any.
    #[getter]
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Queues a task and returns its id. Inputs are checked now.
    fn submit(&self, py: Python<'_>, task: PyRef<'_, PyTask>) -> PyResult<u64> {
        let m = self.get()?;
        let t = task.inner.clone();
        let touches_files = task.touches_files;
        drop(task);
        if touches_files {
            py.allow_threads(|| m.m().submit(t)).map_err(submit_error)
        } else {
            // Without files a submit is a few microseconds and never blocks
            // (an unbounded channel; a manager's default environment is
            // hashed once and memoized). Releasing the GIL for it would
            // mean waiting to get it back behind the caller's other threads
            // (Parsl's submit loop): 0.2 ms on average, measured, for 9 us
            // of work.
            m.m().submit(t).map_err(submit_error)
        }
    }

    /// Queues many tasks at once (one crossing, the GIL released once).
    /// Returns the ids of those queued, in order, and the error that stopped
    /// the rest (None when all were).
    fn submit_many(
        &self,
        py: Python<'_>,
        tasks: Vec<PyRef<'_, PyTask>>,
    ) -> PyResult<(Vec<u64>, Option<PyErr>)> {
        let m = self.get()?;
        let owned: Vec<Task> = tasks.iter().map(|t| t.inner.clone()).collect();
        drop(tasks);
        let mut ids = Vec::with_capacity(owned.len());
        let failed = py.allow_threads(|| {
            for t in owned {
                match m.m().submit(t) {
                    Ok(id) => ids.push(id),
                    Err(e) => return Some(e),
                }
            }
            None
        });
        Ok((ids, failed.map(submit_error)))
    }

    /// Up to `max` finished tasks: waits at most `timeout` seconds (None or
    /// negative: for ever) for the first, then takes those already done.
    /// Empty after the timeout. Releases the GIL; Ctrl-C interrupts it.
    #[pyo3(signature = (max=1024, timeout=None))]
    fn wait_many(
        &self,
        py: Python<'_>,
        max: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<PyTaskResult>> {
        let m = self.get()?;
        let got = wait_sliced(py, timeout, |slice| {
            let got = m.m().wait_many(max.max(1), Some(slice));
            (!got.is_empty()).then_some(got)
        })?;
        Ok(got
            .unwrap_or_default()
            .into_iter()
            .map(|r| PyTaskResult::new(py, r))
            .collect())
    }

    /// The next finished task, or None after `timeout` seconds (None or a
    /// negative timeout waits for ever). Releases the GIL; Ctrl-C interrupts it.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyTaskResult>> {
        let m = self.get()?;
        let got = wait_sliced(py, timeout, |slice| m.m().wait(Some(slice)))?;
        Ok(got.map(|r| PyTaskResult::new(py, r)))
    }

    /// Cancels a task; its result (outcome "cancelled") still comes out of
    /// `wait`. False if it is not queued or running.
    fn cancel(&self, py: Python<'_>, id: u64) -> PyResult<bool> {
        let m = self.get()?;
        Ok(py.allow_threads(|| m.m().cancel(id)))
    }

    /// Cancels every task with this tag; returns how many.
    fn cancel_by_tag(&self, py: Python<'_>, tag: &str) -> PyResult<usize> {
        let m = self.get()?;
        Ok(py.allow_threads(|| m.m().cancel_by_tag(tag)))
    }

    /// Counts of tasks and workers and resources in use, as a dict.
    fn stats(&self, py: Python<'_>) -> PyResult<PyObject> {
        let m = self.get()?;
        let s = py.allow_threads(|| m.m().stats());
        to_py(py, &s)
    }

    /// The connected workers: dicts of host, addr, resources, running.
    fn workers(&self, py: Python<'_>) -> PyResult<PyObject> {
        let m = self.get()?;
        let w = py.allow_threads(|| m.m().workers());
        to_py(py, &w)
    }

    /// True when more tasks would keep the workers busy.
    fn hungry(&self, py: Python<'_>) -> PyResult<bool> {
        let m = self.get()?;
        Ok(py.allow_threads(|| m.m().hungry()))
    }

    /// Configures a category from a dict of `drover_master::CategoryConfig`
    /// fields (mode, max, first, margin, min_samples, window, max_buckets, seed,
    /// grow_in_place).
    fn set_category(&self, py: Python<'_>, name: &str, config: &Bound<'_, PyDict>) -> PyResult<()> {
        let m = self.get()?;
        let config: CategoryConfig = pythonize::depythonize(config.as_any())
            .map_err(|e| PyValueError::new_err(format!("category {name:?}: {e}")))?;
        py.allow_threads(|| m.m().set_category(name, config))
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }

    /// What the category has learned and what it cost, as a dict; None if unknown.
    fn category_stats(&self, py: Python<'_>, name: &str) -> PyResult<PyObject> {
        let m = self.get()?;
        let s = py.allow_threads(|| m.m().category_stats(name));
        to_py(py, &s)
    }

    /// Statistics of every category.
    fn categories(&self, py: Python<'_>) -> PyResult<PyObject> {
        let m = self.get()?;
        let s = py.allow_threads(|| m.m().categories());
        to_py(py, &s)
    }

    /// True when every submitted task has come back from `wait`.
    fn empty(&self) -> PyResult<bool> {
        Ok(self.get()?.m().is_empty())
    }

    /// Stops listening and closes every worker connection (workers then look
    /// for a master again until their idle timeout). Idempotent.
    fn shutdown(&mut self, py: Python<'_>) {
        if let Some(SharedManager(mut m)) = self.inner.take() {
            py.allow_threads(move || m.shutdown());
        }
    }

    /// Tells every connected worker to exit, then shuts down.
    fn shutdown_workers(&mut self, py: Python<'_>) {
        if let Some(SharedManager(mut m)) = self.inner.take() {
            py.allow_threads(move || m.shutdown_workers());
        }
    }

    /// True after shutdown.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.is_none()
    }
}

/// Calls `take` (without the GIL) with slices of at most SIGNAL_SLICE until
/// it gives something or `timeout` seconds (None or negative: never) pass,
/// checking for Ctrl-C between slices.
fn wait_sliced<T: Send>(
    py: Python<'_>,
    timeout: Option<f64>,
    take: impl Fn(Duration) -> Option<T> + Sync,
) -> PyResult<Option<T>> {
    let deadline = match timeout {
        Some(t) if t >= 0.0 => Some(Instant::now() + seconds(t, "timeout")?),
        _ => None,
    };
    loop {
        let slice = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(SIGNAL_SLICE),
            None => SIGNAL_SLICE,
        };
        if let Some(got) = py.allow_threads(|| take(slice)) {
            return Ok(Some(got));
        }
        py.check_signals()?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// The Python exception of a refused submit.
fn submit_error(e: SubmitError) -> PyErr {
    match e {
        SubmitError::InputMissing(m) => PyFileNotFoundError::new_err(m),
        SubmitError::InvalidName(m) | SubmitError::Invalid(m) => PyValueError::new_err(m),
        other => DroverError::new_err(other.to_string()),
    }
}

fn parse_limits(limits: Option<&Bound<'_, PyDict>>) -> PyResult<Limits> {
    let mut l = Limits::default();
    let Some(d) = limits else { return Ok(l) };
    for (k, v) in d.iter() {
        let key: String = k.extract()?;
        match key.as_str() {
            "memory" | "memory_mb" => l.memory_mb = Some(v.extract()?),
            "disk" | "disk_mb" => l.disk_mb = Some(v.extract()?),
            "wall_time" => l.wall_time = Some(seconds(v.extract()?, "wall_time")?),
            "cores" => l.cores = Some(v.extract()?),
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown limit {other:?} (expected memory, disk, wall_time or cores)"
                )))
            }
        }
    }
    Ok(l)
}

fn open_out(path: Option<PathBuf>) -> PyResult<std::process::Stdio> {
    Ok(match path {
        Some(p) => std::fs::File::create(&p)
            .map_err(|e| PyRuntimeError::new_err(format!("{}: {e}", p.display())))?
            .into(),
        None => std::process::Stdio::inherit(),
    })
}

/// Runs `argv` under the resource monitor and returns
/// `(exit_code, signal, limit_exceeded, summary)`. Blocks with the GIL
/// released; Ctrl-C kills the command's tree and raises KeyboardInterrupt.
#[pyfunction]
#[pyo3(signature = (argv, limits=None, interval=0.1, cwd=None, stdout=None, stderr=None, sandbox=None))]
#[allow(clippy::too_many_arguments)]
fn monitor_run(
    py: Python<'_>,
    argv: Vec<String>,
    limits: Option<&Bound<'_, PyDict>>,
    interval: f64,
    cwd: Option<PathBuf>,
    stdout: Option<PathBuf>,
    stderr: Option<PathBuf>,
    sandbox: Option<PathBuf>,
) -> PyResult<Py<PyTuple>> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| PyValueError::new_err("empty command"))?;
    let limits = parse_limits(limits)?;
    let interval = seconds(interval, "interval")?.max(Duration::from_millis(10));
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(open_out(stdout)?)
        .stderr(open_out(stderr)?);
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let monitor = Monitor::with_options(MonitorOptions {
        interval,
        ..Default::default()
    });
    let mut watched = monitor
        .spawn(cmd, sandbox.as_deref(), limits)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start {program}: {e}")))?;
    let fd = watched.pidfd().as_raw_fd();
    let report = loop {
        py.allow_threads(|| {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; the descriptor outlives this call.
            unsafe { libc::poll(&mut p, 1, SIGNAL_SLICE.as_millis() as libc::c_int) };
        });
        match watched.try_finish() {
            Ok(Some(r)) => break r,
            Ok(None) => {}
            Err(e) => return Err(PyRuntimeError::new_err(format!("monitor: {e}"))),
        }
        if let Err(e) = py.check_signals() {
            watched.kill();
            let _ = py.allow_threads(move || watched.wait());
            return Err(e);
        }
    };
    Ok(PyTuple::new(py, report_objects(py, &report)?)?.unbind())
}

/// A monitor report as Python sees it: `(exit_code, signal,
/// limit_exceeded, summary)`.
fn report_objects(py: Python<'_>, report: &drover_monitor::Report) -> PyResult<[PyObject; 4]> {
    let (code, signal) = match report.exit {
        Exit::Code(c) => (Some(c), None),
        Exit::Signal(s) => (None, Some(s)),
    };
    let exceeded = report
        .summary
        .limits_exceeded
        .as_ref()
        .map(|l| to_py(py, l))
        .transpose()?;
    Ok([
        code.into_pyobject(py)?.into_any().unbind(),
        signal.into_pyobject(py)?.into_any().unbind(),
        exceeded.into_pyobject(py)?.into_any().unbind(),
        to_py(py, &report.summary)?,
    ])
}

/// The drover version this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _drover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTask>()?;
    m.add_class::<PyTaskResult>()?;
    m.add_class::<PyManager>()?;
    m.add_function(wrap_pyfunction!(monitor_run, m)?)?;
    m.add_function(wrap_pyfunction!(monitored::monitored_call, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add("DroverError", m.py().get_type::<DroverError>())?;
    Ok(())
}

//! Placement of waiting tasks on workers.
//!
//! The scheduler is pure bookkeeping: no I/O, no clock, no randomness. The
//! master feeds it events (workers joining and leaving, tasks queued,
//! cancelled and finished, files cached) and asks it for [`Placement`]s.
//!
//! # Design
//!
//! **Shapes.** Waiting tasks are grouped by their [`Request`] ("shape"). Each
//! shape keeps its tasks in an ordered set keyed by (priority descending, seq
//! ascending). Tasks of one shape are interchangeable as far as fitting is
//! concerned, so only the head of each shape is ever a candidate: whatever
//! holds for the head holds for the rest. That is what makes the cost of a
//! placement independent of the number of queued tasks, and what keeps tasks
//! of the same shape in order.
//!
//! **Ready and blocked shapes.** The heads of all shapes that might fit
//! somewhere live in one ordered `ready` set, so the globally best task is
//! its first element. When a head fits no worker, its shape moves to a
//! `blocked` list and the loop continues with the next head, which is how
//! lower-priority tasks of other shapes backfill. Free resources only grow
//! on [`Scheduler::release`] and [`Scheduler::add_worker`], so those are the
//! only places a shape can become unblocked; they re-check the blocked
//! shapes against that one worker only. The blocked mark is therefore exact
//! ("fits on no worker right now"), and a blocked shape costs nothing in
//! [`Scheduler::schedule`]; a failed worker search happens at most once per
//! unblocking event.
//!
//! **Worker index.** Workers are kept in a set ordered by (free gpus, free
//! cores). A request for `g` gpus and `c` cores starts at the first worker
//! with exactly `g` free gpus and at least `c` free cores, and moves up gpu
//! levels only when needed. This is best fit: small tasks fill up partly
//! used workers, leaving idle workers whole (for [`Request::WholeWorker`]
//! tasks and for the factory to retire) and keeping gpu workers for gpu
//! tasks. Memory and disk are checked while walking; they usually scale
//! with cores so the first candidate nearly always fits. Workers with
//! nothing running are also kept in an `idle` set for whole-worker tasks.
//!
//! **Cache affinity.** For each cached file the scheduler keeps the workers
//! that hold it. A task remembers only the first cached input it is given
//! (the engine gives them in the order the task declared them: it does not
//! know their sizes); before the general search, up to [`AFFINITY_SCAN`]
//! holders of that file are tried. The cap bounds the cost for a file cached everywhere.
//!
//! **Memory.** Per queued task the scheduler stores one 24-byte entry in
//! its shape's B-tree and one 24-byte slot in the task index (needed to
//! cancel a task or replace it), about 80 bytes in all with B-tree and hash
//! table slack.
//!
//! Workers are addressed internally by a dense slot (reused after removal)
//! so that hot paths index a `Vec` instead of hashing the master's key.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, VecDeque};

// Keys are small integers the master assigns (task, worker, file, shape
// ids): SipHash's flooding resistance buys nothing and it was ~11% of the
// master's instructions per task (callgrind, scale bench).
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use drover_protocol::Resources;

pub use crate::task::TaskId;
pub use drover_protocol::packing::{workers_needed_for, Request};

/// The master's worker slot id.
pub type WorkerKey = u32;
/// An interned id of a cached input file.
pub type FileKey = u32;

/// How many holders of a task's first cached input are tried before falling
/// back to the general best-fit search.
pub const AFFINITY_SCAN: usize = 16;

/// Stands for "no cached input" inside a waiting entry; a `FileKey` of
/// `u32::MAX` therefore never attracts a task.
const NO_FILE: FileKey = FileKey::MAX;

/// A decision to run `task` on `worker`, with `allocation` reserved there
/// until [`Scheduler::release`] gives it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The task to start.
    pub task: TaskId,
    /// The worker to start it on.
    pub worker: WorkerKey,
    /// What was reserved for it (the request, or the worker's total for a
    /// whole-worker task).
    pub allocation: Resources,
}

/// A waiting task inside its shape's queue.
///
/// Equality and order look only at (priority, seq, task): `file` rides along
/// in what would otherwise be padding, and must not matter when a cancelled
/// task is looked up from its index entry, which does not know it.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    priority: i32,
    file: FileKey,
    seq: u64,
    task: TaskId,
}

impl Waiting {
    fn order(&self) -> (Reverse<i32>, u64, TaskId) {
        (Reverse(self.priority), self.seq, self.task)
    }
}

impl PartialEq for Waiting {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Waiting {}

impl PartialOrd for Waiting {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiting {
    fn cmp(&self, other: &Self) -> Ordering {
        self.order().cmp(&other.order())
    }
}

/// Index into `Scheduler::shapes`; u32 keeps [`Loc`] at 16 bytes.
type ShapeId = u32;

/// Where a waiting task sits, enough to find its queue entry again.
#[derive(Clone, Copy, Debug)]
struct Loc {
    shape: ShapeId,
    priority: i32,
    seq: u64,
}

/// What a shape is keyed by: its request, or (for tasks whose allocation
/// is decided by a category) a class whose request the master can change
/// while its tasks wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ShapeKey {
    Request(Request),
    Class(ClassKey),
    /// A request the master may still change while its tasks wait (see
    /// [`Scheduler::enqueue_provisional`]).
    Provisional(Request),
}

/// A class of tasks that share one changeable request (see
/// [`Scheduler::enqueue_class`]).
pub type ClassKey = u32;

#[derive(Debug)]
struct Shape {
    key: ShapeKey,
    request: Request,
    queue: BTreeSet<Waiting>,
    /// True while the shape is on the blocked list (and so not in `ready`).
    blocked: bool,
}

/// A task sent ahead to a worker, not started there yet.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    task: TaskId,
    allocation: Resources,
    /// Asked back ([`Scheduler::recall_for`]); the worker's answer is due.
    recalling: bool,
}

/// Holders of tasks sent ahead that [`Scheduler::recall_for`] looks at, at
/// most, for one worker with room: bounds its cost when every worker holds
/// some (then the waiting queue feeds the free worker anyway).
const RECALL_SCAN: usize = 64;

#[derive(Debug, Default)]
struct WorkerState {
    key: WorkerKey,
    total: Resources,
    free: Resources,
    /// Tasks placed and not yet released; "idle" needs this, since a task
    /// may reserve nothing at all.
    running: u32,
    files: HashSet<FileKey>,
    /// Tasks sent ahead to wait on the worker (see [`Scheduler::prefetch`]),
    /// in the order the worker starts them. While there are any, the
    /// worker is out of the indexes: only the worker knows when they start.
    queued: VecDeque<Ahead>,
    /// Kept out of the indexes by [`Scheduler::set_blocked`]: nothing new
    /// is placed or sent ahead here.
    blocked: bool,
    /// The disk the worker last reported really free, MB
    /// ([`Scheduler::set_disk_free`]); None until it reports.
    disk_free: Option<u64>,
}

impl WorkerState {
    /// Whether the worker is in the placement indexes (`by_free`, `idle`).
    fn indexed(&self) -> bool {
        self.queued.is_empty() && !self.blocked
    }

    fn is_idle(&self) -> bool {
        self.running == 0 && self.free == self.total
    }

    fn index_key(&self, slot: usize) -> (u32, u32, usize) {
        (self.free.gpus, self.free.cores, slot)
    }

    /// What a new task may have here: what is free, its disk at most what
    /// the worker reports really free (its cache and other users' files
    /// take disk that no allocation accounts for).
    fn room(&self) -> Resources {
        let mut room = self.free;
        if let Some(disk) = self.disk_free {
            room.disk_mb = room.disk_mb.min(disk);
        }
        room
    }
}

/// Decides which waiting task runs on which worker. See the module
/// documentation for the data structures and their costs.
#[derive(Debug, Default)]
pub struct Scheduler {
    shapes: Vec<Shape>,
    shape_ids: HashMap<ShapeKey, ShapeId>,
    /// Current request of each class (see [`Scheduler::set_class_request`]).
    class_requests: HashMap<ClassKey, Request>,
    /// Classes whose tasks may be sent ahead (see
    /// [`Scheduler::set_class_may_go_ahead`]).
    classes_ahead: HashSet<ClassKey>,
    free_shapes: Vec<ShapeId>,
    /// Heads of non-empty, unblocked shapes.
    ready: BTreeSet<(Waiting, ShapeId)>,
    blocked: Vec<ShapeId>,
    /// Waiting tasks by id (indexed, not hashed: see `crate::idtable`).
    tasks: crate::idtable::IdTable<Loc>,

    workers: Vec<WorkerState>,
    slots: HashMap<WorkerKey, usize>,
    free_slots: Vec<usize>,
    /// Every live worker by (free gpus, free cores, slot).
    by_free: BTreeSet<(u32, u32, usize)>,
    idle: BTreeSet<usize>,
    holders: HashMap<FileKey, Vec<usize>>,
    /// Workers holding tasks sent ahead that are not being recalled.
    ahead: BTreeSet<usize>,
    /// Component-wise at most every allocation a worker in `ahead` holds
    /// (the minimum of those sent ahead since `ahead` was last seen empty,
    /// so never above the true minimum): a room this does not fit in fits
    /// none of them, and [`Scheduler::recall_for`] skips its scan. With
    /// 1,000 full workers, every worker touched in a pass scanned up to
    /// [`RECALL_SCAN`] queues for nothing: 4–5% of the master's CPU.
    ahead_min: Option<Resources>,
}

impl Scheduler {
    /// An empty scheduler: no workers, no tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a worker offering `total`. Re-adding a known key replaces
    /// it as if it had been removed first.
    pub fn add_worker(&mut self, worker: WorkerKey, total: Resources) {
        if self.slots.contains_key(&worker) {
            self.remove_worker(worker);
        }
        let state = WorkerState {
            key: worker,
            total,
            free: total,
            running: 0,
            files: HashSet::default(),
            queued: VecDeque::new(),
            blocked: false,
            disk_free: None,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.workers[slot] = state;
                slot
            }
            None => {
                self.workers.push(state);
                self.workers.len() - 1
            }
        };
        self.slots.insert(worker, slot);
        self.by_free.insert(self.workers[slot].index_key(slot));
        self.idle.insert(slot);
        self.unblock_for(slot);
    }

    /// Forget the worker (the master requeues its running tasks itself with
    /// `enqueue` and their original `seq`). Those tasks must not be
    /// [`release`](Scheduler::release)d afterwards: if the key is reused by
    /// a new worker, the release would credit the newcomer.
    pub fn remove_worker(&mut self, worker: WorkerKey) {
        let Some(slot) = self.slots.remove(&worker) else {
            return;
        };
        let state = std::mem::take(&mut self.workers[slot]);
        self.by_free.remove(&state.index_key(slot));
        self.idle.remove(&slot);
        self.ahead.remove(&slot);
        for file in state.files {
            if let Some(holders) = self.holders.get_mut(&file) {
                if let Some(pos) = holders.iter().position(|&s| s == slot) {
                    holders.swap_remove(pos);
                }
                if holders.is_empty() {
                    self.holders.remove(&file);
                }
            }
        }
        self.free_slots.push(slot);
        // Shapes stay unblocked even if this worker was their only fit: the
        // next schedule finds out with one search and blocks them then.
    }

    /// Queue a task. Order: higher `priority` first, then lower `seq`
    /// (submission order; a requeued task keeps its seq so it goes back to
    /// its place). `cached_inputs`: the task's cached input files, the one
    /// to seek first; the scheduler prefers a worker that already holds
    /// that one (see [`Scheduler::note_cached`]) if that worker fits.
    ///
    /// Queueing a task that is already waiting replaces it.
    pub fn enqueue(
        &mut self,
        task: TaskId,
        request: Request,
        priority: i32,
        seq: u64,
        cached_inputs: &[FileKey],
    ) {
        self.enqueue_keyed(
            task,
            ShapeKey::Request(request),
            request,
            priority,
            seq,
            cached_inputs,
        );
    }

    /// Queue a task with a request the master may still change while it
    /// waits (a learned task's retry, whose rung its category re-decides as
    /// it learns): like [`Scheduler::enqueue`], but never sent ahead, since
    /// a task sent ahead holds its worker to the request it was sent with.
    pub fn enqueue_provisional(
        &mut self,
        task: TaskId,
        request: Request,
        priority: i32,
        seq: u64,
        cached_inputs: &[FileKey],
    ) {
        self.enqueue_keyed(
            task,
            ShapeKey::Provisional(request),
            request,
            priority,
            seq,
            cached_inputs,
        );
    }

    /// Queue a task whose request is its class's current one (a whole
    /// worker until [`Scheduler::set_class_request`] says otherwise). All
    /// waiting tasks of a class form one shape, so changing the class's
    /// request costs O(1) however many tasks wait: this is how a category's
    /// learned allocation reaches tasks that were queued before it was
    /// learned.
    pub fn enqueue_class(
        &mut self,
        task: TaskId,
        class: ClassKey,
        priority: i32,
        seq: u64,
        cached_inputs: &[FileKey],
    ) {
        let request = self
            .class_requests
            .get(&class)
            .copied()
            .unwrap_or(Request::WholeWorker);
        self.enqueue_keyed(
            task,
            ShapeKey::Class(class),
            request,
            priority,
            seq,
            cached_inputs,
        );
    }

    /// Sets what the waiting (and future) tasks of `class` ask for. A
    /// blocked class goes back to the ready set, since the new request may
    /// fit where the old one did not.
    /// Whether `class`'s waiting tasks may be sent ahead to a full worker.
    /// Off by default: the master turns it on for a class whose tasks hold
    /// no room for growth, since room that frees on a worker with tasks
    /// sent ahead goes to them, not to a frozen task waiting to grow.
    pub fn set_class_may_go_ahead(&mut self, class: ClassKey, may: bool) {
        if may {
            self.classes_ahead.insert(class);
        } else {
            self.classes_ahead.remove(&class);
        }
    }

    pub fn set_class_request(&mut self, class: ClassKey, request: Request) {
        self.class_requests.insert(class, request);
        let Some(&id) = self.shape_ids.get(&ShapeKey::Class(class)) else {
            return;
        };
        let shape = &mut self.shapes[id as usize];
        shape.request = request;
        if shape.blocked {
            shape.blocked = false;
            if let Some(&head) = shape.queue.first() {
                self.ready.insert((head, id));
            }
            self.blocked.retain(|&b| b != id);
        }
    }

    fn enqueue_keyed(
        &mut self,
        task: TaskId,
        key: ShapeKey,
        request: Request,
        priority: i32,
        seq: u64,
        cached_inputs: &[FileKey],
    ) {
        self.remove_waiting(task);
        let shape = self.intern(key, request);
        let entry = Waiting {
            priority,
            file: cached_inputs.first().copied().unwrap_or(NO_FILE),
            seq,
            task,
        };
        let queue = &mut self.shapes[shape as usize].queue;
        let old_head = queue.first().copied();
        queue.insert(entry);
        self.tasks.insert(
            task,
            Loc {
                shape,
                priority,
                seq,
            },
        );
        self.refresh_ready(shape, old_head);
    }

    /// Remove a waiting task (cancel). Returns false if it isn't waiting.
    pub fn remove_waiting(&mut self, task: TaskId) -> bool {
        let Some(loc) = self.tasks.remove(&task) else {
            return false;
        };
        let key = Waiting {
            priority: loc.priority,
            file: NO_FILE,
            seq: loc.seq,
            task,
        };
        let queue = &mut self.shapes[loc.shape as usize].queue;
        let old_head = queue.first().copied();
        queue.remove(&key);
        self.refresh_ready(loc.shape, old_head);
        self.retire_if_empty(loc.shape);
        true
    }

    /// A task that ran on `worker` with `allocation` is finished: give the
    /// resources back. Unknown workers are ignored (the worker may have been
    /// removed while the task ran).
    pub fn release(&mut self, worker: WorkerKey, allocation: Resources) {
        self.give_back(worker, allocation, true);
    }

    /// Reserves up to `want` more of `worker`'s free resources for a task
    /// running there that needs to grow, and returns what it got (in each
    /// resource, at most what is free). The master adds it to the task's
    /// allocation once it has all it needs, or returns it with
    /// [`Scheduler::give`]. What is taken is no longer free, so no task is
    /// placed in it: a growing task reserves the room it waits for.
    pub fn take(&mut self, worker: WorkerKey, want: Resources) -> Resources {
        let Some(&slot) = self.slots.get(&worker) else {
            return Resources::default();
        };
        let w = &mut self.workers[slot];
        let got = Resources::min_each(&want, &w.free);
        if got.is_zero() {
            return got;
        }
        if w.is_idle() {
            self.idle.remove(&slot);
        }
        self.by_free.remove(&w.index_key(slot));
        w.free = w.free.saturating_sub(&got);
        if w.indexed() {
            self.by_free.insert(w.index_key(slot));
        }
        got
    }

    /// Returns resources got from [`Scheduler::take`] that no task ended
    /// up holding.
    pub fn give(&mut self, worker: WorkerKey, resources: Resources) {
        self.give_back(worker, resources, false);
    }

    fn give_back(&mut self, worker: WorkerKey, resources: Resources, task_ended: bool) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        let w = &mut self.workers[slot];
        self.by_free.remove(&w.index_key(slot));
        // Clamped so that a duplicate release cannot invent capacity.
        w.free = Resources::min_each(&w.free.saturating_add(&resources), &w.total);
        if task_ended {
            w.running = w.running.saturating_sub(1);
        }
        self.reindex_if_unqueued(slot);
    }

    /// A task that was on `worker` with `allocation` is finished, whether
    /// it ran or was still waiting there (see [`Scheduler::prefetch`]): only
    /// a task that ran gives resources back.
    pub fn release_task(&mut self, worker: WorkerKey, task: TaskId, allocation: Resources) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        let queued = &mut self.workers[slot].queued;
        match queued.iter().position(|a| a.task == task) {
            Some(pos) => {
                queued.remove(pos);
                self.refresh_ahead(slot);
                self.reindex_if_unqueued(slot);
            }
            None => self.release(worker, allocation),
        }
    }

    /// Sends a waiting task ahead to `worker`, which is full for it now,
    /// to wait there and start the moment the worker has room, without a
    /// round trip to the master: at most `depth` such tasks per worker.
    /// The candidates are the heads of the shapes that fit no worker now
    /// (after [`Scheduler::schedule`]), best first, that fit in the
    /// worker's total; a learned task's retry, and a class not let go ahead
    /// ([`Scheduler::set_class_may_go_ahead`]), are not sent ahead. Until the worker says
    /// it started them ([`Scheduler::started`]), nothing else is placed on
    /// it. Costs O(blocked shapes).
    pub fn prefetch(&mut self, worker: WorkerKey, depth: usize) -> Option<Placement> {
        let &slot = self.slots.get(&worker)?;
        let w = &self.workers[slot];
        if w.queued.len() >= depth || w.running == 0 || w.blocked {
            return None;
        }
        let total = w.total;
        let (id, head, request) = self
            .blocked
            .iter()
            .filter_map(|&id| {
                let shape = &self.shapes[id as usize];
                let may = match shape.key {
                    ShapeKey::Request(_) => true,
                    ShapeKey::Class(c) => self.classes_ahead.contains(&c),
                    ShapeKey::Provisional(_) => false,
                };
                match shape.request {
                    Request::Fixed(r) if may && r.fits_in(&total) => {
                        Some((id, *shape.queue.first()?, r))
                    }
                    _ => None,
                }
            })
            .min_by_key(|&(_, head, _)| head.order())?;
        let queue = &mut self.shapes[id as usize].queue;
        queue.pop_first();
        self.tasks.remove(&head.task);
        self.retire_if_empty(id);
        let w = &mut self.workers[slot];
        if w.queued.is_empty() {
            self.by_free.remove(&w.index_key(slot));
            self.idle.remove(&slot);
        }
        w.queued.push_back(Ahead {
            task: head.task,
            allocation: request,
            recalling: false,
        });
        self.ahead.insert(slot);
        self.note_ahead(&request);
        Some(Placement {
            task: head.task,
            worker,
            allocation: request,
        })
    }

    /// `worker` started `task`, which it held queued: its allocation is now
    /// in use there. False if the task was not queued on it.
    pub fn started(&mut self, worker: WorkerKey, task: TaskId) -> bool {
        let Some(&slot) = self.slots.get(&worker) else {
            return false;
        };
        let w = &mut self.workers[slot];
        let Some(pos) = w.queued.iter().position(|a| a.task == task) else {
            return false;
        };
        let Some(ahead) = w.queued.remove(pos) else {
            return false;
        };
        w.free = w.free.saturating_sub(&ahead.allocation);
        w.running = w.running.saturating_add(1);
        self.refresh_ahead(slot);
        self.reindex_if_unqueued(slot);
        true
    }

    /// A task sent ahead to another worker, not started there, that fits
    /// in what `worker` has free now: the master asks its holder to give it
    /// back, so that it does not wait behind a long task while `worker`
    /// idles. Returns (holder, task) and marks it as being recalled (it is
    /// not offered twice); the holder's answer goes to
    /// [`Scheduler::release_task`] (given back: the task is then enqueued
    /// again), [`Scheduler::started`] or [`Scheduler::recall_refused`].
    /// Only for a worker in the indexes (holding nothing sent ahead, not
    /// blocked); the last task a holder would start is offered first.
    /// Costs O(1) when no worker holds tasks sent ahead, else at most
    /// [`RECALL_SCAN`] holders times their queue.
    pub fn recall_for(&mut self, worker: WorkerKey) -> Option<(WorkerKey, TaskId)> {
        if self.ahead.is_empty() {
            self.ahead_min = None;
            return None;
        }
        let &slot = self.slots.get(&worker)?;
        let w = &self.workers[slot];
        if !w.indexed() {
            return None;
        }
        let room = w.room();
        if !self.ahead_min.is_some_and(|m| m.fits_in(&room)) {
            return None;
        }
        let (holder, task) = self
            .ahead
            .iter()
            .filter(|&&h| h != slot)
            .take(RECALL_SCAN)
            .find_map(|&h| {
                let queued = &self.workers[h].queued;
                let a = queued
                    .iter()
                    .rev()
                    .find(|a| !a.recalling && a.allocation.fits_in(&room))?;
                Some((h, a.task))
            })?;
        let h = &mut self.workers[holder];
        for a in h.queued.iter_mut().filter(|a| a.task == task) {
            a.recalling = true;
        }
        let key = h.key;
        self.refresh_ahead(holder);
        Some((key, task))
    }

    /// `worker` did not give back `task` (see [`Scheduler::recall_for`]),
    /// and it is still queued there: it may be offered again.
    pub fn recall_refused(&mut self, worker: WorkerKey, task: TaskId) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        let mut back = None;
        for a in self.workers[slot].queued.iter_mut() {
            if a.task == task {
                a.recalling = false;
                back = Some(a.allocation);
            }
        }
        // It may have been left out of the minimum if `ahead` was empty since.
        if let Some(r) = back {
            self.note_ahead(&r);
        }
        self.refresh_ahead(slot);
    }

    /// Folds an allocation that is now a candidate for recall into `ahead_min`.
    fn note_ahead(&mut self, r: &Resources) {
        self.ahead_min = Some(match self.ahead_min {
            None => *r,
            Some(m) => m.min_each(r),
        });
    }

    /// Keeps `ahead` exact for `slot` after its queue changed.
    fn refresh_ahead(&mut self, slot: usize) {
        if self.workers[slot].queued.iter().any(|a| !a.recalling) {
            self.ahead.insert(slot);
        } else {
            self.ahead.remove(&slot);
        }
    }

    /// What `worker` reports really free on its disk, MB: a task whose disk
    /// is more is not placed there; more room than before may let blocked
    /// shapes in.
    pub fn set_disk_free(&mut self, worker: WorkerKey, free_mb: u64) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        let w = &mut self.workers[slot];
        let grew = w.disk_free.is_some_and(|d| free_mb > d);
        w.disk_free = Some(free_mb);
        if grew && w.indexed() {
            self.unblock_for(slot);
        }
    }

    /// Keeps `worker` out of placement (a worker that keeps refusing tasks)
    /// or lets it back in. What runs there goes on and is released as usual.
    pub fn set_blocked(&mut self, worker: WorkerKey, blocked: bool) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        let w = &mut self.workers[slot];
        if w.blocked == blocked {
            return;
        }
        w.blocked = blocked;
        if blocked {
            let key = w.index_key(slot);
            self.by_free.remove(&key);
            self.idle.remove(&slot);
        } else {
            self.reindex_if_unqueued(slot);
        }
    }

    /// Whether any worker holds tasks sent ahead that are not being recalled.
    pub fn any_sent_ahead(&self) -> bool {
        !self.ahead.is_empty()
    }

    /// Whether `worker` holds tasks sent ahead that have not started.
    pub fn has_queue(&self, worker: WorkerKey) -> bool {
        self.queued_len(worker) > 0
    }

    /// How many tasks sent ahead `worker` holds, not started yet.
    pub fn queued_len(&self, worker: WorkerKey) -> usize {
        self.slots
            .get(&worker)
            .map_or(0, |&slot| self.workers[slot].queued.len())
    }

    /// Puts a worker whose queue just emptied back in the indexes.
    fn reindex_if_unqueued(&mut self, slot: usize) {
        let w = &self.workers[slot];
        if !w.indexed() {
            return;
        }
        self.by_free.insert(w.index_key(slot));
        if w.is_idle() {
            self.idle.insert(slot);
        }
        self.unblock_for(slot);
    }

    /// Record that `worker` holds cached file `file` (from its hello
    /// inventory, or after a transfer).
    pub fn note_cached(&mut self, worker: WorkerKey, file: FileKey) {
        let Some(&slot) = self.slots.get(&worker) else {
            return;
        };
        if self.workers[slot].files.insert(file) {
            self.holders.entry(file).or_default().push(slot);
        }
    }

    /// Place as many waiting tasks as fit right now, appending to `out`;
    /// resources of placed tasks are reserved on their workers. Never
    /// overcommits a worker in any resource. Higher priority first; a task
    /// that fits nowhere does not block lower-priority tasks of other shapes
    /// that do fit (backfill), but tasks of the same shape keep their order.
    pub fn schedule(&mut self, out: &mut Vec<Placement>) {
        self.schedule_up_to(out, usize::MAX);
    }

    /// Like [`Scheduler::schedule`] but at most `max` placements (so the
    /// master can interleave I/O).
    pub fn schedule_up_to(&mut self, out: &mut Vec<Placement>, max: usize) {
        let mut placed = 0;
        while placed < max {
            let Some((head, shape)) = self.ready.pop_first() else {
                break;
            };
            let request = self.shapes[shape as usize].request;
            let Some(slot) = self.find_worker(&request, head.file) else {
                self.shapes[shape as usize].blocked = true;
                self.blocked.push(shape);
                continue;
            };
            let allocation = self.reserve(slot, &request);
            let queue = &mut self.shapes[shape as usize].queue;
            queue.pop_first();
            match queue.first() {
                Some(&next) => {
                    self.ready.insert((next, shape));
                }
                None => self.retire_if_empty(shape),
            }
            self.tasks.remove(&head.task);
            out.push(Placement {
                task: head.task,
                worker: self.workers[slot].key,
                allocation,
            });
            placed += 1;
        }
    }

    /// How many tasks are waiting.
    pub fn waiting(&self) -> usize {
        self.tasks.len()
    }

    /// True if `task` is waiting.
    pub fn is_waiting(&self, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
    }

    /// Waiting tasks grouped by request: what a factory needs to decide how
    /// many workers of a given size to start.
    pub fn demand(&self) -> Vec<(Request, usize)> {
        self.live_shapes()
            .map(|s| (s.request, s.queue.len()))
            .collect()
    }

    /// How many workers of size `worker` the waiting tasks could keep busy:
    /// the waiting requests packed first-fit-decreasing into bins of that
    /// size, counting at most `limit` bins. Whole-worker tasks take a bin
    /// each; requests that do not fit in an empty bin are not counted.
    ///
    /// Identical tasks are packed a group at a time and identical bins are
    /// kept as one run, so the cost depends on the number of shapes, not on
    /// the number of tasks or bins.
    pub fn workers_needed(&self, worker: Resources, limit: usize) -> usize {
        workers_needed_for(
            self.live_shapes().map(|s| (s.request, s.queue.len())),
            worker,
            limit,
        )
    }

    /// Unreserved resources on `worker`, or `None` if it is not known.
    pub fn free(&self, worker: WorkerKey) -> Option<Resources> {
        self.slots.get(&worker).map(|&slot| self.workers[slot].free)
    }

    fn live_shapes(&self) -> impl Iterator<Item = &Shape> {
        self.shapes.iter().filter(|s| !s.queue.is_empty())
    }

    fn intern(&mut self, key: ShapeKey, request: Request) -> ShapeId {
        if let Some(&id) = self.shape_ids.get(&key) {
            return id;
        }
        let shape = Shape {
            key,
            request,
            queue: BTreeSet::new(),
            blocked: false,
        };
        let id = match self.free_shapes.pop() {
            Some(id) => {
                self.shapes[id as usize] = shape;
                id
            }
            None => {
                // Every live shape holds at least one task, so 2^32 of them
                // cannot fit in memory.
                let id = ShapeId::try_from(self.shapes.len()).expect("fewer than 2^32 shapes");
                self.shapes.push(shape);
                id
            }
        };
        self.shape_ids.insert(key, id);
        id
    }

    /// Empty shapes are recycled so that a stream of distinct requests does
    /// not grow the shape table or the blocked list without bound.
    fn retire_if_empty(&mut self, shape: ShapeId) {
        let s = &mut self.shapes[shape as usize];
        if !s.queue.is_empty() {
            return;
        }
        if s.blocked {
            s.blocked = false;
            self.blocked.retain(|&b| b != shape);
        }
        self.shape_ids.remove(&s.key);
        self.free_shapes.push(shape);
    }

    /// Keep `ready` holding the shape's current head after its queue changed.
    fn refresh_ready(&mut self, shape: ShapeId, old_head: Option<Waiting>) {
        let s = &self.shapes[shape as usize];
        if s.blocked {
            return;
        }
        let new_head = s.queue.first().copied();
        if old_head == new_head {
            return;
        }
        if let Some(old) = old_head {
            self.ready.remove(&(old, shape));
        }
        if let Some(new) = new_head {
            self.ready.insert((new, shape));
        }
    }

    /// The worker at `slot` just gained room: move the blocked shapes that
    /// now fit there back to `ready`.
    fn unblock_for(&mut self, slot: usize) {
        let w = &self.workers[slot];
        let (free, idle) = (w.room(), w.is_idle());
        let mut i = 0;
        while i < self.blocked.len() {
            let id = self.blocked[i];
            let shape = &mut self.shapes[id as usize];
            let fits = match shape.request {
                Request::Fixed(r) => r.fits_in(&free),
                Request::WholeWorker => idle,
            };
            if !fits {
                i += 1;
                continue;
            }
            shape.blocked = false;
            if let Some(&head) = shape.queue.first() {
                self.ready.insert((head, id));
            }
            self.blocked.swap_remove(i);
        }
    }

    fn find_worker(&self, request: &Request, file: FileKey) -> Option<usize> {
        let best = match request {
            Request::Fixed(r) => self.best_fit(r),
            Request::WholeWorker => self.idle.first().copied(),
        };
        if file == NO_FILE {
            return best;
        }
        // The best fit holds the file already (always, for a file every
        // worker holds): no holder need be tried.
        let best_holds = |slot: usize| self.workers[slot].files.contains(&file);
        if best.is_none_or(best_holds) {
            return best;
        }
        let preferred = |slot: &&usize| {
            let w = &self.workers[**slot];
            if !w.indexed() {
                return false;
            }
            match request {
                Request::Fixed(r) => r.fits_in(&w.room()),
                Request::WholeWorker => w.is_idle(),
            }
        };
        self.holders
            .get(&file)
            .and_then(|holders| holders.iter().take(AFFINITY_SCAN).find(preferred))
            .copied()
            .or(best)
    }

    /// The worker with the fewest free gpus, then fewest free cores, on
    /// which `r` fits.
    fn best_fit(&self, r: &Resources) -> Option<usize> {
        let mut gpus = r.gpus;
        loop {
            let level = (gpus, r.cores, 0)..=(gpus, u32::MAX, usize::MAX);
            for &(_, _, slot) in self.by_free.range(level) {
                if r.fits_in(&self.workers[slot].room()) {
                    return Some(slot);
                }
            }
            let next = gpus.checked_add(1)?;
            gpus = self.by_free.range((next, 0, 0)..).next()?.0;
        }
    }

    fn reserve(&mut self, slot: usize, request: &Request) -> Resources {
        let w = &mut self.workers[slot];
        let allocation = match request {
            Request::Fixed(r) => *r,
            Request::WholeWorker => w.total,
        };
        if w.is_idle() {
            self.idle.remove(&slot);
        }
        self.by_free.remove(&w.index_key(slot));
        w.free = w.free.saturating_sub(&allocation);
        w.running = w.running.saturating_add(1);
        self.by_free.insert(w.index_key(slot));
        allocation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cores: u32, memory_mb: u64) -> Resources {
        Resources {
            cores,
            memory_mb,
            ..Default::default()
        }
    }

    fn fixed(cores: u32) -> Request {
        Request::Fixed(res(cores, 0))
    }

    fn run(s: &mut Scheduler) -> Vec<Placement> {
        let mut out = Vec::new();
        s.schedule(&mut out);
        out
    }

    fn tasks(placements: &[Placement]) -> Vec<TaskId> {
        placements.iter().map(|p| p.task).collect()
    }

    /// Worker 1 of one core and `memory_mb`, tasks 1 to 3 of one core
    /// each, task 1 placed on it.
    fn one_core_three_tasks(memory_mb: u64) -> Scheduler {
        let mut s = Scheduler::new();
        s.add_worker(1, res(1, memory_mb));
        for t in 1..=3 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        s
    }

    /// A recall scan is skipped only when no task sent ahead could fit:
    /// a task whose recall was refused is a candidate again even after
    /// every other one was recalled (the bound was reset meanwhile).
    #[test]
    fn recall_finds_a_task_given_up_after_the_bound_was_reset() {
        let mut s = one_core_three_tasks(1000);
        let ahead: Vec<TaskId> = (0..2)
            .filter_map(|_| s.prefetch(1, 2))
            .map(|p| p.task)
            .collect();
        assert_eq!(ahead, vec![2, 3]);
        s.add_worker(2, res(1, 1000));
        assert_eq!(s.recall_for(2), Some((1, 3)));
        assert_eq!(s.recall_for(2), Some((1, 2)));
        // Nothing left to recall: the bound is reset.
        assert_eq!(s.recall_for(2), None);
        s.recall_refused(1, 2);
        assert_eq!(s.recall_for(2), Some((1, 2)));
        // A full worker has no room for any of them.
        s.recall_refused(1, 2);
        s.enqueue(4, fixed(1), 0, 4, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![4]);
        assert_eq!(s.recall_for(2), None);
    }

    /// Room taken for a growing task is reserved: nothing is placed in it,
    /// and what is given back is placeable again. The worker is not idle
    /// while any is taken, and taking more than is free gets what is free.
    #[test]
    fn taken_room_is_reserved_until_given_back() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(4, 1000));
        let small = Request::Fixed(res(1, 300));
        s.enqueue(1, small, 0, 1, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        // Task 1 grows by 500 MB; 200 MB stay free.
        assert_eq!(s.take(1, res(0, 500)), res(0, 500));
        s.enqueue(2, small, 0, 2, &[]);
        assert!(run(&mut s).is_empty(), "300 MB do not fit in 200");
        assert_eq!(s.take(1, res(0, 900)), res(0, 200), "only what is free");
        assert_eq!(s.free(1), Some(res(3, 0)));
        s.give(1, res(0, 200));
        // Task 1 ends holding its grown 800 MB: all is free again.
        s.release(1, res(1, 800));
        assert_eq!(s.free(1), Some(res(4, 1000)));
        assert_eq!(tasks(&run(&mut s)), vec![2]);
        s.release(1, res(1, 300));
        s.enqueue(3, Request::WholeWorker, 0, 3, &[]);
        assert_eq!(s.take(1, res(1, 0)), res(1, 0));
        assert!(run(&mut s).is_empty(), "not idle while room is taken");
        s.give(1, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![3]);
    }

    /// A task sent ahead waits on its worker: nothing else is placed there
    /// until the worker says it started it; a sent-ahead task that ends
    /// without starting (cancelled) frees nothing; tasks of a class, or
    /// a learned task's retry, are never sent ahead.
    #[test]
    fn tasks_sent_ahead_hold_their_worker_until_started() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(2, 0));
        for t in 1..=5 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert_eq!(tasks(&run(&mut s)), vec![1, 2]);
        assert_eq!(s.prefetch(1, 1).map(|p| p.task), Some(3));
        assert_eq!(s.prefetch(1, 1), None, "depth 1");
        assert!(s.has_queue(1));
        // Task 1 ends: the worker starts 3 on its own; the master places
        // nothing there before it hears so.
        s.release_task(1, 1, res(1, 0));
        assert!(run(&mut s).is_empty());
        assert!(s.started(1, 3));
        assert!(!s.has_queue(1));
        assert!(run(&mut s).is_empty(), "full again: 2 and 3 run");
        assert_eq!(s.prefetch(1, 1).map(|p| p.task), Some(4));
        // Cancelled while waiting there: frees nothing.
        s.release_task(1, 4, res(1, 0));
        assert!(!s.has_queue(1));
        assert_eq!(s.free(1), Some(res(0, 0)));
        s.release_task(1, 2, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![5]);
        assert!(!s.started(1, 5), "5 was placed, not sent ahead");

        let mut s = Scheduler::new();
        s.add_worker(1, res(1, 0));
        s.enqueue_class(1, 7, 0, 1, &[]);
        s.set_class_request(7, fixed(1));
        s.enqueue_class(2, 7, 0, 2, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        assert_eq!(
            s.prefetch(1, 1),
            None,
            "a class is not let go ahead by default"
        );
        // A class the master lets go ahead (it holds no growth room) is.
        s.set_class_may_go_ahead(7, true);
        assert_eq!(s.prefetch(1, 1).map(|p| p.task), Some(2));
        s.set_class_may_go_ahead(7, false);
        s.enqueue_class(3, 7, 0, 3, &[]);
        assert_eq!(s.prefetch(1, 2), None, "and no longer once it is stopped");

        // Nor is a learned task's retry, whose rung may change too.
        let mut s = Scheduler::new();
        s.add_worker(1, res(1, 0));
        s.enqueue_provisional(1, fixed(1), 0, 1, &[]);
        s.enqueue_provisional(2, fixed(1), 0, 2, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        assert_eq!(s.prefetch(1, 1), None, "a rung may change");
        s.release_task(1, 1, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![2], "placed like any other");
    }

    #[test]
    fn orders_by_priority_then_seq() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(100, 0));
        s.enqueue(10, fixed(1), 0, 3, &[]);
        s.enqueue(11, fixed(2), 0, 1, &[]);
        s.enqueue(12, fixed(1), 5, 4, &[]);
        s.enqueue(13, fixed(2), 5, 2, &[]);
        s.enqueue(14, fixed(1), -1, 0, &[]);
        s.enqueue(15, fixed(1), 0, 2, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![13, 12, 11, 15, 10, 14]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn schedule_up_to_respects_max_and_order() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(100, 0));
        for t in 0..10 {
            s.enqueue(t, fixed(1 + (t as u32 % 3)), 0, t, &[]);
        }
        let mut out = Vec::new();
        s.schedule_up_to(&mut out, 4);
        assert_eq!(tasks(&out), vec![0, 1, 2, 3]);
        s.schedule_up_to(&mut out, 0);
        assert_eq!(out.len(), 4);
        s.schedule(&mut out);
        assert_eq!(tasks(&out), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn requeued_task_keeps_its_place() {
        let mut s = one_core_three_tasks(0);
        // The worker dies; the master requeues task 1 with its seq.
        s.remove_worker(1);
        s.enqueue(1, fixed(1), 0, 1, &[]);
        s.add_worker(2, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        s.release(2, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![2]);
    }

    #[test]
    fn backfills_across_shapes_but_keeps_order_within_a_shape() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(4, 0));
        s.enqueue(1, fixed(2), 0, 0, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        // 2 cores free: the 3-core tasks wait, the 1-core tasks backfill.
        s.enqueue(10, fixed(3), 9, 1, &[]);
        s.enqueue(11, fixed(1), 0, 2, &[]);
        s.enqueue(12, fixed(3), 9, 3, &[]);
        s.enqueue(13, fixed(1), 0, 4, &[]);
        s.enqueue(14, fixed(1), 0, 5, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![11, 13]);
        assert_eq!(s.waiting(), 3);
        s.release(1, res(2, 0));
        s.release(1, res(1, 0));
        // 3 cores free: the older 3-core task goes first, in its shape order.
        assert_eq!(tasks(&run(&mut s)), vec![10]);
        s.release(1, res(3, 0));
        s.release(1, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![12, 14]);
    }

    #[test]
    fn whole_worker_only_on_idle_worker_and_gets_the_total() {
        let mut s = Scheduler::new();
        let big = Resources {
            cores: 8,
            memory_mb: 16_000,
            disk_mb: 1000,
            gpus: 1,
        };
        s.add_worker(1, res(4, 8000));
        s.add_worker(2, big);
        s.enqueue(1, fixed(1), 0, 0, &[]);
        assert_eq!(run(&mut s)[0].worker, 1);
        s.enqueue(2, Request::WholeWorker, 0, 1, &[]);
        s.enqueue(3, Request::WholeWorker, 0, 2, &[]);
        let out = run(&mut s);
        assert_eq!(
            out,
            vec![Placement {
                task: 2,
                worker: 2,
                allocation: big
            }]
        );
        assert_eq!(s.free(2), Some(Resources::default()));
        s.release(1, res(1, 0));
        let out = run(&mut s);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].task, out[0].worker), (3, 1));
        assert_eq!(out[0].allocation, res(4, 8000));
    }

    #[test]
    fn a_task_that_reserves_nothing_still_makes_its_worker_busy() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(2, 0));
        s.enqueue(1, Request::Fixed(Resources::default()), 1, 0, &[]);
        s.enqueue(2, Request::WholeWorker, 0, 1, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![1]);
        s.release(1, Resources::default());
        assert_eq!(tasks(&run(&mut s)), vec![2]);
    }

    #[test]
    fn never_overcommits_any_resource() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(4, 1000));
        s.add_worker(
            2,
            Resources {
                cores: 4,
                memory_mb: 1000,
                disk_mb: 100,
                gpus: 1,
            },
        );
        for t in 0..4 {
            s.enqueue(t, Request::Fixed(res(1, 400)), 0, t, &[]);
        }
        let gpu = Resources {
            cores: 1,
            gpus: 1,
            ..Default::default()
        };
        s.enqueue(10, Request::Fixed(gpu), 0, 10, &[]);
        s.enqueue(11, Request::Fixed(gpu), 0, 11, &[]);
        let disk = Resources {
            cores: 1,
            disk_mb: 101,
            ..Default::default()
        };
        s.enqueue(12, Request::Fixed(disk), 0, 12, &[]);
        let out = run(&mut s);
        // Memory allows two per worker; one gpu; disk never fits.
        assert_eq!(tasks(&out), vec![0, 1, 2, 3, 10]);
        for w in [1, 2] {
            let mem: u64 = out
                .iter()
                .filter(|p| p.worker == w)
                .map(|p| p.allocation.memory_mb)
                .sum();
            assert!(mem <= 1000);
        }
        assert_eq!(out[4].worker, 2);
        assert_eq!(s.waiting(), 2);
    }

    /// A worker whose disk is really fuller than its allocations say gets
    /// no task whose disk cannot fit, and gets it once it reports room.
    #[test]
    fn reported_free_disk_keeps_tasks_that_cannot_fit_away() {
        let mut s = Scheduler::new();
        let total = Resources {
            disk_mb: 1000,
            ..res(4, 1000)
        };
        s.add_worker(1, total);
        s.set_disk_free(1, 30);
        let disk = |mb| Resources {
            disk_mb: mb,
            ..res(1, 0)
        };
        s.enqueue(1, Request::Fixed(disk(100)), 0, 1, &[]);
        s.enqueue(2, Request::Fixed(disk(10)), 0, 2, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![2], "only what fits the real disk");
        s.set_disk_free(1, 500);
        assert_eq!(tasks(&run(&mut s)), vec![1], "placed once there is room");
    }

    #[test]
    fn release_lets_waiting_tasks_in() {
        let mut s = Scheduler::new();
        s.add_worker(7, res(2, 0));
        for t in 0..4 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert_eq!(tasks(&run(&mut s)), vec![0, 1]);
        assert!(run(&mut s).is_empty());
        s.release(7, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![2]);
        assert_eq!(s.free(7), Some(res(0, 0)));
        s.release(7, res(1, 0));
        s.release(7, res(1, 0));
        assert_eq!(tasks(&run(&mut s)), vec![3]);
        assert_eq!(s.free(7), Some(res(1, 0)));
    }

    #[test]
    fn blocked_shape_is_unblocked_by_a_new_worker() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(2, 0));
        s.enqueue(1, fixed(4), 0, 0, &[]);
        s.enqueue(2, Request::WholeWorker, 0, 1, &[]);
        s.enqueue(3, fixed(1), 1, 2, &[]);
        assert_eq!(tasks(&run(&mut s)), vec![3]);
        s.add_worker(2, res(4, 0));
        s.add_worker(3, res(1, 0));
        let out = run(&mut s);
        assert_eq!(tasks(&out), vec![1, 2]);
        assert_eq!((out[0].worker, out[1].worker), (2, 3));
    }

    #[test]
    fn cache_affinity_prefers_holder_that_fits() {
        let mut s = Scheduler::new();
        // Best fit alone would pick worker 1 (fewer free cores).
        s.add_worker(1, res(2, 0));
        s.add_worker(2, res(4, 0));
        s.note_cached(2, 7);
        s.note_cached(2, 7);
        s.enqueue(1, fixed(1), 0, 0, &[7, 8]);
        s.enqueue(2, fixed(1), 0, 1, &[]);
        s.enqueue(3, fixed(3), 0, 2, &[7]);
        s.enqueue(4, fixed(2), 0, 3, &[7]);
        let out = run(&mut s);
        let on: Vec<_> = out.iter().map(|p| (p.task, p.worker)).collect();
        // Task 4's holder is full by then and worker 1 has only 1 core
        // left, so it waits until worker 1 has room.
        assert_eq!(on, vec![(1, 2), (2, 1), (3, 2)]);
        s.release(1, res(1, 0));
        assert_eq!(
            run(&mut s),
            vec![Placement {
                task: 4,
                worker: 1,
                allocation: res(2, 0)
            }]
        );
    }

    /// Among holders, the best fit wins: a file every worker holds (the
    /// shared input of a whole campaign) costs no scan of its holders, and
    /// tasks pack onto the fullest worker as tasks without inputs do.
    #[test]
    fn cache_affinity_takes_the_best_fit_when_it_holds_the_file() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(4, 0));
        s.add_worker(2, res(2, 0));
        s.add_worker(3, res(4, 0));
        for w in 1..=3 {
            s.note_cached(w, 7);
        }
        s.enqueue(1, fixed(1), 0, 0, &[7]);
        s.enqueue(2, fixed(1), 0, 1, &[7]);
        s.enqueue(3, fixed(1), 0, 2, &[7]);
        let on: Vec<_> = run(&mut s).iter().map(|p| (p.task, p.worker)).collect();
        assert_eq!(on, vec![(1, 2), (2, 2), (3, 1)]);
    }

    #[test]
    fn remove_worker_forgets_it_and_its_cache() {
        let mut s = Scheduler::new();
        s.add_worker(1, res(4, 0));
        s.add_worker(2, res(4, 0));
        s.note_cached(1, 5);
        s.remove_worker(1);
        s.remove_worker(1);
        assert_eq!(s.free(1), None);
        s.release(1, res(1, 0));
        s.enqueue(1, fixed(1), 0, 0, &[5]);
        assert_eq!(run(&mut s)[0].worker, 2);
        // The freed slot is reused without inheriting the old cache.
        s.add_worker(3, res(8, 0));
        s.add_worker(4, res(8, 0));
        s.note_cached(4, 5);
        s.enqueue(2, fixed(1), 0, 1, &[5]);
        assert_eq!(run(&mut s)[0].worker, 4);
        s.remove_worker(2);
        s.remove_worker(3);
        s.remove_worker(4);
        s.enqueue(3, fixed(1), 0, 2, &[5]);
        assert!(run(&mut s).is_empty());
    }

    #[test]
    fn remove_waiting_cancels() {
        let mut s = Scheduler::new();
        for t in 0..4 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert!(s.remove_waiting(0));
        assert!(!s.remove_waiting(0));
        assert!(s.remove_waiting(2));
        assert!(!s.remove_waiting(99));
        assert_eq!(s.waiting(), 2);
        assert!(!s.is_waiting(2) && s.is_waiting(3));
        s.add_worker(1, res(8, 0));
        assert_eq!(tasks(&run(&mut s)), vec![1, 3]);
        assert!(!s.remove_waiting(1));
        assert!(s.demand().is_empty());
    }

    #[test]
    fn enqueue_twice_replaces() {
        let mut s = Scheduler::new();
        s.enqueue(1, fixed(1), 0, 5, &[]);
        s.enqueue(2, fixed(1), 0, 6, &[]);
        s.enqueue(1, fixed(2), 0, 7, &[]);
        assert_eq!(s.waiting(), 2);
        s.add_worker(1, res(8, 0));
        let out = run(&mut s);
        assert_eq!(tasks(&out), vec![2, 1]);
        assert_eq!(out[1].allocation, res(2, 0));
    }

    #[test]
    fn demand_groups_by_request() {
        let mut s = Scheduler::new();
        for t in 0..5 {
            s.enqueue(t, fixed(4), 0, t, &[]);
        }
        for t in 5..7 {
            s.enqueue(t, Request::WholeWorker, 0, t, &[]);
        }
        s.enqueue(7, fixed(1), 0, 7, &[]);
        let mut d = s.demand();
        d.sort_by_key(|(r, _)| match r {
            Request::Fixed(r) => r.cores,
            Request::WholeWorker => 0,
        });
        assert_eq!(
            d,
            vec![(Request::WholeWorker, 2), (fixed(1), 1), (fixed(4), 5)]
        );
    }

    #[test]
    fn workers_needed_packs_first_fit_decreasing() {
        let eight = res(8, 16_000);
        let mut s = Scheduler::new();
        assert_eq!(s.workers_needed(eight, 100), 0);
        for t in 0..10 {
            s.enqueue(t, fixed(4), 0, t, &[]);
        }
        assert_eq!(s.workers_needed(eight, 100), 5);
        assert_eq!(s.workers_needed(eight, 3), 3);
        assert_eq!(s.workers_needed(eight, 0), 0);

        // 5 + 3x4 cores: 5 | 4+4 | 4, and the 3 1-core tasks fill the gaps.
        let mut s = Scheduler::new();
        s.enqueue(0, fixed(5), 0, 0, &[]);
        for t in 1..4 {
            s.enqueue(t, fixed(4), 0, t, &[]);
        }
        assert_eq!(s.workers_needed(eight, 100), 3);
        for t in 4..11 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert_eq!(s.workers_needed(eight, 100), 3);
        s.enqueue(11, fixed(1), 0, 11, &[]);
        assert_eq!(s.workers_needed(eight, 100), 4);

        // Memory is the limit here, and too-big or whole-worker requests.
        let mut s = Scheduler::new();
        for t in 0..4 {
            s.enqueue(t, Request::Fixed(res(1, 6000)), 0, t, &[]);
        }
        s.enqueue(4, fixed(9), 0, 4, &[]);
        assert_eq!(s.workers_needed(eight, 100), 2);
        s.enqueue(5, Request::WholeWorker, 0, 5, &[]);
        s.enqueue(6, Request::WholeWorker, 0, 6, &[]);
        assert_eq!(s.workers_needed(eight, 100), 4);
        assert_eq!(s.workers_needed(eight, 2), 2);

        // Many tasks, one run of bins: 100,001 1-core tasks on 8 cores.
        let mut s = Scheduler::new();
        for t in 0..100_001 {
            s.enqueue(t, fixed(1), 0, t, &[]);
        }
        assert_eq!(s.workers_needed(eight, usize::MAX), 12_501);
    }

    #[test]
    fn workers_needed_splits_runs_in_first_fit_order() {
        let eight = res(8, 0);
        let mut s = Scheduler::new();
        // Six 5-core tasks leave six bins with 3 cores free; five 2-core
        // tasks take one each of the first five.
        for t in 0..6 {
            s.enqueue(t, fixed(5), 0, t, &[]);
        }
        for t in 6..11 {
            s.enqueue(t, fixed(2), 0, t, &[]);
        }
        assert_eq!(s.workers_needed(eight, 100), 6);
        for t in 11..13 {
            s.enqueue(t, fixed(3), 0, t, &[]);
        }
        // 3-core tasks sort before 2-core ones: they fill two of the six
        // gaps, the 2-core tasks the other four plus one new bin.
        assert_eq!(s.workers_needed(eight, 100), 7);
        s.enqueue(13, Request::Fixed(Resources::default()), 0, 13, &[]);
        assert_eq!(s.workers_needed(eight, 100), 7);
        let mut z = Scheduler::new();
        z.enqueue(1, Request::Fixed(Resources::default()), 0, 1, &[]);
        assert_eq!(z.workers_needed(eight, 100), 1);
    }

    #[test]
    fn workers_needed_for_counts_packs_like_the_queue() {
        let eight = res(8, 16_000);
        // Ten 4-core tasks need five 8-core workers, not ten (nor forty).
        assert_eq!(workers_needed_for([(fixed(4), 10)], eight, 100), 5);
        assert_eq!(workers_needed_for([(fixed(4), 10)], res(1, 0), 100), 0);
        assert_eq!(workers_needed_for([(fixed(1), 40)], res(1, 0), 2), 2);
        // The same counts split over repeated entries pack the same way.
        let mut s = Scheduler::new();
        for t in 0..6 {
            s.enqueue(t, fixed(5), 0, t, &[]);
        }
        for t in 6..11 {
            s.enqueue(t, fixed(2), 0, t, &[]);
        }
        let split = [(fixed(2), 3), (fixed(5), 6), (fixed(2), 2), (fixed(7), 0)];
        assert_eq!(
            workers_needed_for(split, eight, 100),
            s.workers_needed(eight, 100)
        );
        assert_eq!(
            workers_needed_for([(Request::WholeWorker, 3)], eight, 100),
            3
        );
    }
}

//! Open MPI for CPU tensors, loaded when a process is started by `mpirun` (`lmx launch`).
//!
//! The library (`libmpi.so.40`, Open MPI 3 to 5) is opened at run time, so the `lmx` binary
//! starts on machines without Open MPI and only `lmx launch` needs it. Handles are Open MPI's
//! (pointers to its predefined objects, looked up by name); MPICH's ABI differs and is not
//! supported.
//!
//! Every collective is issued non-blocking and waited for with a deadline: a rank that does
//! not join within the group's timeout is named (the waiting ranks tell each other that they
//! wait; the silent ones are the suspects) and the whole job is stopped with `MPI_Abort`,
//! instead of hanging. A rank that dies is noticed by `mpirun`, which stops the others.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use lmx_core::{DType, Device, Result, Tensor};

use crate::{Group, Wait};

/// An Open MPI handle (`MPI_Comm`, `MPI_Datatype`, `MPI_Op`, `MPI_Request`, `MPI_Errhandler`
/// are all pointers there).
type Handle = *mut c_void;

/// Open MPI's `MPI_Status` (its public fields, then two private ones).
#[repr(C)]
#[derive(Default)]
struct Status {
    source: c_int,
    tag: c_int,
    error: c_int,
    cancelled: c_int,
    ucount: usize,
}

const MPI_SUCCESS: c_int = 0;
const MPI_ANY_SOURCE: c_int = -1;
const MPI_THREAD_SERIALIZED: c_int = 2;
const MPI_IN_PLACE: Handle = 1 as Handle;
/// Tags of the point-to-point messages: a tensor's header, its data, and "I am waiting".
const TAG_HEADER: c_int = 11;
const TAG_DATA: c_int = 12;
const TAG_WAITING: c_int = 13;
/// How long the waiting ranks listen for each other before naming the silent ones.
const HEAR_OTHERS: Duration = Duration::from_secs(2);

type Fn0 = unsafe extern "C" fn() -> c_int;
type FnPtr = unsafe extern "C" fn(*mut c_int) -> c_int;
type FnComm = unsafe extern "C" fn(Handle, *mut c_int) -> c_int;

type MpiInitThread = unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char, c_int, *mut c_int) -> c_int;
type MpiAbort = unsafe extern "C" fn(Handle, c_int) -> c_int;
type MpiCommSplit = unsafe extern "C" fn(Handle, c_int, c_int, *mut Handle) -> c_int;
type MpiCommSetErrhandler = unsafe extern "C" fn(Handle, Handle) -> c_int;
type MpiIallreduce = unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Handle, Handle, Handle, *mut Handle) -> c_int;
type MpiIallgather = unsafe extern "C" fn(*const c_void, c_int, Handle, *mut c_void, c_int, Handle, Handle, *mut Handle) -> c_int;
type MpiIallgatherv = unsafe extern "C" fn(*const c_void, c_int, Handle, *mut c_void, *const c_int, *const c_int, Handle, Handle, *mut Handle) -> c_int;
type MpiIbcast = unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, Handle, *mut Handle) -> c_int;
type MpiIbarrier = unsafe extern "C" fn(Handle, *mut Handle) -> c_int;
type MpiIsend = unsafe extern "C" fn(*const c_void, c_int, Handle, c_int, c_int, Handle, *mut Handle) -> c_int;
type MpiIrecv = unsafe extern "C" fn(*mut c_void, c_int, Handle, c_int, c_int, Handle, *mut Handle) -> c_int;
type MpiIprobe = unsafe extern "C" fn(c_int, c_int, Handle, *mut c_int, *mut Status) -> c_int;
type MpiTest = unsafe extern "C" fn(*mut Handle, *mut c_int, *mut Status) -> c_int;
type MpiErrorString = unsafe extern "C" fn(c_int, *mut c_char, *mut c_int) -> c_int;

/// The entry points and predefined handles lmx uses.
struct Api {
    init_thread: MpiInitThread,
    initialized: FnPtr,
    finalized: FnPtr,
    finalize: Fn0,
    abort: MpiAbort,
    comm_rank: FnComm,
    comm_size: FnComm,
    comm_set_errhandler: MpiCommSetErrhandler,
    comm_split: MpiCommSplit,
    iallreduce: MpiIallreduce,
    iallgather: MpiIallgather,
    iallgatherv: MpiIallgatherv,
    ibcast: MpiIbcast,
    ibarrier: MpiIbarrier,
    isend: MpiIsend,
    irecv: MpiIrecv,
    iprobe: MpiIprobe,
    test: MpiTest,
    error_string: MpiErrorString,
    world: Handle,
    float: Handle,
    double: Handle,
    byte: Handle,
    int: Handle,
    sum: Handle,
    errors_return: Handle,
}

// SAFETY: the handles are addresses of Open MPI's immutable predefined objects and the
// functions are plain C entry points; calls are serialized by `Mpi::lock`.
unsafe impl Send for Api {}
// SAFETY: as above.
unsafe impl Sync for Api {}

fn library_names() -> Vec<String> {
    match std::env::var("LMX_MPI_LIBRARY") {
        Ok(path) => vec![path],
        Err(_) => vec!["libmpi.so.40".into(), "libmpi.so".into()],
    }
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

impl Api {
    fn load() -> std::result::Result<Api, String> {
        let mut tried = Vec::new();
        let mut lib = std::ptr::null_mut();
        for name in library_names() {
            let c = CString::new(name.clone()).map_err(|_| format!("LMX_MPI_LIBRARY {name:?} contains a NUL byte"))?;
            // SAFETY: dlopen with a valid C string. RTLD_GLOBAL: Open MPI's plugins resolve
            // libmpi's symbols through the global namespace.
            lib = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !lib.is_null() {
                break;
            }
            tried.push(format!("{name}: {}", dlerror()));
        }
        if lib.is_null() {
            return Err(format!(
                "Open MPI's library could not be loaded ({}). Install Open MPI (Debian/Ubuntu: apt install openmpi-bin; Fedora: dnf install openmpi) or set LMX_MPI_LIBRARY to the path of libmpi.so.40",
                tried.join("; ")
            ));
        }
        let sym = |name: &str| -> std::result::Result<*mut c_void, String> {
            let c = CString::new(name).map_err(|_| name.to_string())?;
            // SAFETY: dlsym on a handle dlopen returned, with a valid C string.
            let p = unsafe { libc::dlsym(lib, c.as_ptr()) };
            if p.is_null() {
                Err(format!("the MPI library has no symbol {name}: lmx needs Open MPI (3.x to 5.x), not MPICH or another MPI ({})", dlerror()))
            } else {
                Ok(p)
            }
        };
        macro_rules! func {
            ($name:literal, $ty:ty) => {{
                let p = sym($name)?;
                // SAFETY: the symbol is the MPI function of that name; its C signature is
                // `$ty` (MPI standard, Open MPI's mpi.h).
                unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
            }};
        }
        Ok(Api {
            init_thread: func!("MPI_Init_thread", MpiInitThread),
            initialized: func!("MPI_Initialized", FnPtr),
            finalized: func!("MPI_Finalized", FnPtr),
            finalize: func!("MPI_Finalize", Fn0),
            abort: func!("MPI_Abort", MpiAbort),
            comm_rank: func!("MPI_Comm_rank", FnComm),
            comm_size: func!("MPI_Comm_size", FnComm),
            comm_set_errhandler: func!("MPI_Comm_set_errhandler", MpiCommSetErrhandler),
            comm_split: func!("MPI_Comm_split", MpiCommSplit),
            iallreduce: func!("MPI_Iallreduce", MpiIallreduce),
            iallgather: func!("MPI_Iallgather", MpiIallgather),
            iallgatherv: func!("MPI_Iallgatherv", MpiIallgatherv),
            ibcast: func!("MPI_Ibcast", MpiIbcast),
            ibarrier: func!("MPI_Ibarrier", MpiIbarrier),
            isend: func!("MPI_Isend", MpiIsend),
            irecv: func!("MPI_Irecv", MpiIrecv),
            iprobe: func!("MPI_Iprobe", MpiIprobe),
            test: func!("MPI_Test", MpiTest),
            error_string: func!("MPI_Error_string", MpiErrorString),
            world: sym("ompi_mpi_comm_world")?,
            float: sym("ompi_mpi_float")?,
            double: sym("ompi_mpi_double")?,
            byte: sym("ompi_mpi_byte")?,
            int: sym("ompi_mpi_int")?,
            sum: sym("ompi_mpi_op_sum")?,
            errors_return: sym("ompi_mpi_errors_return")?,
        })
    }

    fn message(&self, code: c_int) -> String {
        let mut buf = [0 as c_char; 512];
        let mut len = 0;
        // SAFETY: MPI_Error_string writes at most MPI_MAX_ERROR_STRING (256) bytes.
        let rc = unsafe { (self.error_string)(code, buf.as_mut_ptr(), &mut len) };
        if rc != MPI_SUCCESS {
            return format!("MPI error {code}");
        }
        // SAFETY: the buffer is NUL-terminated by MPI_Error_string.
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
    }
}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

/// Where a rank reports why it stops the job (a timed-out collective, a failed MPI call):
/// stderr unless [`report_errors_to`] says otherwise.
static REPORT: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Sends this rank's reports of a stopped job to `file` (a launcher that silences the stderr
/// of ranks other than 0 keeps their real stderr for this).
pub fn report_errors_to(file: std::fs::File) {
    *REPORT.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
}

fn report(line: &str) {
    use std::io::Write;
    let text = format!("{line}\n");
    let mut out = REPORT.lock().unwrap_or_else(|e| e.into_inner());
    let _ = match out.as_mut() {
        Some(f) => f.write_all(text.as_bytes()),
        None => std::io::stderr().write_all(text.as_bytes()),
    };
}

fn api() -> Result<&'static Api> {
    API.get_or_init(Api::load).as_ref().map_err(|e| lmx_core::Error::Msg(e.clone()))
}

/// The library, once a communicator exists (it is loaded before any).
fn loaded() -> &'static Api {
    match API.get() {
        Some(Ok(api)) => api,
        _ => unreachable!("an MPI communicator exists only after the library loaded"),
    }
}

/// Whether this process was started by Open MPI's `mpirun` (as `lmx launch` does) in a world
/// of more than one process.
pub fn launched() -> bool {
    std::env::var("OMPI_COMM_WORLD_SIZE").ok().and_then(|s| s.parse::<usize>().ok()).is_some_and(|n| n > 1)
}

/// Ends MPI in this process if it was started (`mpirun` reports a process that exits
/// without it as failed). Call once, after the last collective.
pub fn finalize() {
    let Some(Ok(api)) = API.get() else { return };
    let (mut init, mut fin) = (0, 0);
    // SAFETY: these two may be called at any time.
    unsafe {
        (api.initialized)(&mut init);
        (api.finalized)(&mut fin);
        if init != 0 && fin == 0 {
            (api.finalize)();
        }
    }
}

/// A communicator handle (Open MPI's are pointers to objects that live until the job ends).
#[derive(Debug, Clone, Copy)]
struct Comm(Handle);

// SAFETY: a communicator may be used from any thread; calls are serialized by `Mpi::lock`.
unsafe impl Send for Comm {}
// SAFETY: as above.
unsafe impl Sync for Comm {}

/// The processes `mpirun` started, as one [`Group`] over `MPI_COMM_WORLD` (or a split of it).
#[derive(Debug)]
pub struct Mpi {
    comm: Comm,
    rank: usize,
    size: usize,
    /// How long a collective waits for the other ranks ([`Wait::Collective`]).
    timeout: Duration,
    /// Collectives issued so far (named in timeout errors), and the lock that serializes MPI
    /// calls (the library is initialized for one thread at a time).
    calls: Mutex<u64>,
    /// Nanoseconds spent in collectives and point-to-point transfers.
    busy_ns: std::sync::atomic::AtomicU64,
    /// Sum CUDA tensors with NCCL (made at the first such sum) instead of through host memory.
    nccl: bool,
    #[cfg(feature = "cuda")]
    nccl_comm: OnceLock<lmx_core::nccl::NcclComm>,
}

impl Mpi {
    /// Initializes MPI (once per process) and returns the world; `timeout` bounds every
    /// collective that does not say otherwise.
    pub fn world(timeout: Duration) -> Result<Mpi> {
        let api = api()?;
        let mut init = 0;
        // SAFETY: MPI_Initialized may be called before MPI_Init.
        unsafe { (api.initialized)(&mut init) };
        if init == 0 {
            let mut provided = 0;
            // SAFETY: null argc/argv are allowed by MPI-2 and later.
            let rc = unsafe { (api.init_thread)(std::ptr::null_mut(), std::ptr::null_mut(), MPI_THREAD_SERIALIZED, &mut provided) };
            if rc != MPI_SUCCESS {
                lmx_core::bail!("MPI_Init_thread failed: {}", api.message(rc));
            }
            // Errors come back as return codes (reported with the operation) instead of
            // aborting the job with Open MPI's generic message.
            // SAFETY: both handles are Open MPI's predefined objects.
            unsafe { (api.comm_set_errhandler)(api.world, api.errors_return) };
        }
        Ok(Self::over(Comm(api.world), timeout))
    }

    fn over(comm: Comm, timeout: Duration) -> Mpi {
        let api = loaded();
        let (mut rank, mut size) = (0, 0);
        // SAFETY: a valid communicator.
        unsafe {
            (api.comm_rank)(comm.0, &mut rank);
            (api.comm_size)(comm.0, &mut size);
        }
        Mpi {
            comm,
            rank: rank as usize,
            size: size as usize,
            timeout,
            calls: Mutex::new(0),
            busy_ns: Default::default(),
            nccl: false,
            #[cfg(feature = "cuda")]
            nccl_comm: OnceLock::new(),
        }
    }

    /// Sums CUDA tensors with NCCL (GPU to GPU) instead of copying them through host memory
    /// to Open MPI. Open MPI still starts the ranks, hands NCCL its id, and carries everything
    /// else. An error when this binary was built without CUDA.
    pub fn with_nccl(mut self) -> Result<Self> {
        if !cfg!(feature = "cuda") {
            lmx_core::bail!("the nccl backend needs a binary built with --features cuda");
        }
        self.nccl = true;
        Ok(self)
    }

    /// The NCCL communicator for `device`, made (collectively) at the first call.
    #[cfg(feature = "cuda")]
    fn nccl_comm(&self, device: &Device) -> Result<&lmx_core::nccl::NcclComm> {
        if let Some(c) = self.nccl_comm.get() {
            return Ok(c);
        }
        let id = if self.rank == 0 { Some(lmx_core::nccl::unique_id()?) } else { None };
        let id = crate::broadcast_bytes(self, id.as_deref(), 0, Wait::Collective)?;
        let comm = lmx_core::nccl::NcclComm::new(device, self.rank, self.size, &id)?;
        Ok(self.nccl_comm.get_or_init(|| comm))
    }

    /// Collectives issued so far, and the time spent in them and in transfers.
    pub fn stats(&self) -> (u64, Duration) {
        (*self.lock(), Duration::from_nanos(self.busy_ns.load(std::sync::atomic::Ordering::Relaxed)))
    }

    fn api(&self) -> &'static Api {
        loaded()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one MPI call under the lock, turning its return code into an error naming `what`.
    fn call(&self, what: &str, f: impl FnOnce(&Api) -> c_int) -> Result<()> {
        let rc = {
            let _guard = self.lock();
            f(self.api())
        };
        if rc != MPI_SUCCESS {
            lmx_core::bail!("rank {}: MPI {what} failed: {}", self.rank, self.api().message(rc));
        }
        Ok(())
    }

    /// Starts the collective `what` (numbered), waits for it under `wait`.
    fn collective(&self, what: &str, wait: Wait, start: impl FnOnce(&Api, Handle, *mut Handle) -> c_int) -> Result<()> {
        let number = {
            let mut calls = self.lock();
            *calls += 1;
            *calls
        };
        let mut request: Handle = std::ptr::null_mut();
        let comm = self.comm.0;
        self.call(what, |api| start(api, comm, &mut request))?;
        self.wait(&mut request, &format!("{what} #{number}"), wait)
    }

    /// Polls `request` until it completes: spinning briefly, then yielding, then sleeping, so
    /// a waiting rank leaves the cores to ranks still computing. While it waits it answers
    /// ranks that ask who else is waiting (see [`Mpi::stuck`]). An MPI error here is fatal:
    /// the request may still be using buffers the caller would free.
    fn wait(&self, request: &mut Handle, what: &str, wait: Wait) -> Result<()> {
        let deadline = match wait {
            Wait::Collective => Some(self.timeout),
            Wait::For(d) => Some(d),
            Wait::Forever => None,
        };
        let start = Instant::now();
        let _busy = Busy(&self.busy_ns, start);
        let mut polls = 0u32;
        let mut next_answer = start + Duration::from_millis(50);
        loop {
            let mut done = 0;
            let mut status = Status::default();
            if let Err(e) = self.call(what, |api| {
                // SAFETY: `request` is an active request this rank started.
                unsafe { (api.test)(request, &mut done, &mut status) }
            }) {
                self.fatal(&format!("error: {e}"));
            }
            if done != 0 {
                return Ok(());
            }
            if let Some(limit) = deadline {
                if start.elapsed() > limit {
                    self.stuck(what, limit, wait == Wait::Collective);
                }
            }
            polls = polls.saturating_add(1);
            if polls < 2000 {
                std::hint::spin_loop();
            } else if polls < 20_000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
                if Instant::now() > next_answer {
                    self.answer_waiting_notes();
                    next_answer = Instant::now() + Duration::from_millis(50);
                }
            }
        }
    }

    /// Receives the "I am waiting" notes of ranks that timed out, returning the senders; with
    /// `reply`, answers each with a note of this rank's own (it is waiting too).
    fn take_waiting_notes(&self, reply: bool) -> Vec<usize> {
        let api = self.api();
        let _guard = self.lock();
        let mut senders = Vec::new();
        loop {
            let (mut found, mut status) = (0, Status::default());
            // SAFETY: probing this group's communicator.
            unsafe { (api.iprobe)(MPI_ANY_SOURCE, TAG_WAITING, self.comm.0, &mut found, &mut status) };
            if found == 0 {
                return senders;
            }
            let src = status.source;
            let buf: &'static mut [u8; 1] = Box::leak(Box::new([0u8]));
            let mut request: Handle = std::ptr::null_mut();
            // SAFETY: a matching message is pending; the leaked buffer outlives the receive,
            // and a one-byte message arrives eagerly.
            unsafe {
                (api.irecv)(buf.as_mut_ptr().cast(), 1, api.byte, src, TAG_WAITING, self.comm.0, &mut request);
                let mut done = 0;
                while done == 0 {
                    (api.test)(&mut request, &mut done, std::ptr::null_mut());
                }
            }
            if reply {
                self.send_note(src);
            }
            senders.extend(usize::try_from(src).ok());
        }
    }

    fn answer_waiting_notes(&self) {
        self.take_waiting_notes(true);
    }

    /// Tells rank `peer` that this rank is waiting (fire and forget).
    fn send_note(&self, peer: c_int) {
        let api = self.api();
        let note: &'static mut [u8; 1] = Box::leak(Box::new([1u8]));
        let mut request: Handle = std::ptr::null_mut();
        // SAFETY: the leaked one-byte buffer outlives the send.
        unsafe { (api.isend)(note.as_ptr().cast(), 1, api.byte, peer, TAG_WAITING, self.comm.0, &mut request) };
    }

    /// Reports `line` and stops the whole job.
    fn fatal(&self, line: &str) -> ! {
        report(line);
        let api = self.api();
        // SAFETY: aborting the world ends every rank of the job.
        unsafe { (api.abort)(api.world, 3) };
        std::process::exit(3)
    }

    /// A collective timed out: the waiting ranks tell each other so (ranks waiting in a
    /// collective answer), the ones not heard from are named, and the job stops.
    fn stuck(&self, what: &str, waited: Duration, settable: bool) -> ! {
        for peer in (0..self.size).filter(|&p| p != self.rank) {
            let _guard = self.lock();
            self.send_note(peer as c_int);
        }
        let mut waiting = vec![false; self.size];
        waiting[self.rank] = true;
        let until = Instant::now() + HEAR_OTHERS;
        while Instant::now() < until {
            for src in self.take_waiting_notes(false) {
                if let Some(w) = waiting.get_mut(src) {
                    *w = true;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let ranks = |want: bool| {
            let list: Vec<String> = waiting.iter().enumerate().filter(|(_, w)| **w == want).map(|(r, _)| r.to_string()).collect();
            format!("{} {}", if list.len() == 1 { "rank" } else { "ranks" }, list.join(", "))
        };
        if waiting.iter().position(|w| *w) == Some(self.rank) {
            let who = if waiting.iter().all(|w| *w) { "every rank waited, each in a different collective".to_string() } else { format!("{} did not join ({} waited)", ranks(false), ranks(true)) };
            let hint = if settable { " If a rank is only slow, raise `lmx launch --timeout` (LMX_DIST_TIMEOUT)." } else { "" };
            self.fatal(&format!("error: {what} timed out after {} s: {who}. Stopping all ranks.{hint}", waited.as_secs()));
        }
        // The lowest waiting rank reports; this one stops the job only if it does not.
        std::thread::sleep(HEAR_OTHERS);
        let api = self.api();
        // SAFETY: aborting the world ends every rank of the job.
        unsafe { (api.abort)(api.world, 3) };
        std::process::exit(3)
    }

    fn count(n: usize, what: &str) -> Result<c_int> {
        c_int::try_from(n).map_err(|_| lmx_core::Error::Msg(format!("{what}: {n} elements is more than one MPI message holds (2^31 - 1)")))
    }
}

/// Adds the time since its start to a counter when dropped.
struct Busy<'a>(&'a std::sync::atomic::AtomicU64, Instant);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(self.1.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A dtype's code in headers.
const DTYPES: [(DType, u64); 7] = [(DType::U8, 1), (DType::U32, 2), (DType::I64, 3), (DType::F64, 4), (DType::F32, 5), (DType::BF16, 6), (DType::F16, 7)];

/// The dtype a tensor travels in: its own, except half types as f32 (exact, and MPI has no
/// half type).
fn wire_dtype(dtype: DType) -> DType {
    match dtype {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

fn code_of(dtype: DType) -> Result<u64> {
    DTYPES.iter().find(|(d, _)| *d == dtype).map(|(_, c)| *c).ok_or_else(|| lmx_core::Error::Msg(format!("MPI: tensors of dtype {dtype:?} cannot be sent")))
}

fn dtype_of_code(code: u64) -> Result<DType> {
    DTYPES.iter().find(|(_, c)| *c == code).map(|(d, _)| *d).ok_or_else(|| lmx_core::Error::Msg(format!("MPI: a tensor header names an unknown dtype code {code}")))
}

/// The tensor's elements as bytes (in its wire dtype), on the CPU.
fn to_bytes(x: &Tensor) -> Result<Vec<u8>> {
    let wire = wire_dtype(x.dtype());
    let flat = x.to_device(&Device::Cpu)?.to_dtype(wire)?.flatten_all()?;
    fn raw<T: Copy>(v: Vec<T>) -> Vec<u8> {
        let n = std::mem::size_of_val(v.as_slice());
        // SAFETY: plain numeric values, read as the bytes they are.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n) }.to_vec()
    }
    Ok(match wire {
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => raw(flat.to_vec1::<u32>()?),
        DType::I64 => raw(flat.to_vec1::<i64>()?),
        DType::F64 => raw(flat.to_vec1::<f64>()?),
        _ => raw(flat.to_vec1::<f32>()?),
    })
}

/// A header: wire dtype code, rank, then the dims (at most 8).
const HEADER: usize = 10;

fn header(x: &Tensor) -> Result<[u64; HEADER]> {
    let dims = x.dims();
    if dims.len() > HEADER - 2 {
        lmx_core::bail!("MPI: tensors of rank {} cannot be sent (at most {})", dims.len(), HEADER - 2);
    }
    let mut h = [0u64; HEADER];
    h[0] = code_of(x.dtype())?;
    h[1] = dims.len() as u64;
    for (slot, d) in h[2..].iter_mut().zip(dims) {
        *slot = *d as u64;
    }
    Ok(h)
}

/// The dims a header describes.
fn dims_of(h: &[u64; HEADER]) -> Vec<usize> {
    h[2..2 + (h[1] as usize).min(HEADER - 2)].iter().map(|&d| d as usize).collect()
}

/// How many bytes the tensor a header describes takes on the wire.
fn wire_len(h: &[u64; HEADER]) -> Result<usize> {
    Ok(dims_of(h).iter().product::<usize>() * wire_dtype(dtype_of_code(h[0])?).size_in_bytes())
}

/// The tensor a header and its bytes describe, in its own dtype, on `device`.
fn from_header(h: &[u64; HEADER], bytes: &[u8], device: &Device) -> Result<Tensor> {
    let dtype = dtype_of_code(h[0])?;
    Tensor::from_raw_buffer(bytes, wire_dtype(dtype), &dims_of(h), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)
}

fn header_bytes(h: &mut [u64; HEADER]) -> (*mut c_void, c_int) {
    (h.as_mut_ptr().cast(), (HEADER * 8) as c_int)
}

impl Group for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_sum(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.nccl && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            *self.lock() += 1;
            return self.nccl_comm(x.device())?.all_sum(x);
        }
        if x.dtype() == DType::F64 {
            let mut data = x.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f64>()?;
            let n = Self::count(data.len(), "all_sum")?;
            self.collective("all_sum", Wait::Collective, |api, comm, req| {
                // SAFETY: `data` holds n doubles and lives until the request completes.
                unsafe { (api.iallreduce)(MPI_IN_PLACE, data.as_mut_ptr().cast(), n, api.double, api.sum, comm, req) }
            })?;
            return Tensor::from_vec(data, x.shape(), &Device::Cpu)?.to_device(x.device());
        }
        // Summed in f32 otherwise (MPI has no bf16), rounded once at the end.
        let mut data = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let n = Self::count(data.len(), "all_sum")?;
        self.collective("all_sum", Wait::Collective, |api, comm, req| {
            // SAFETY: `data` holds n floats and lives until the request completes.
            unsafe { (api.iallreduce)(MPI_IN_PLACE, data.as_mut_ptr().cast(), n, api.float, api.sum, comm, req) }
        })?;
        Tensor::from_vec(data, x.shape(), &Device::Cpu)?.to_dtype(x.dtype())?.to_device(x.device())
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let mine = to_bytes(x)?;
        let mut sizes = vec![0 as c_int; self.size];
        let my_size = Self::count(mine.len(), "all_gather")?;
        let my_dim = c_int::try_from(x.dim(dim)?).map_err(|_| lmx_core::Error::Msg("all_gather: dimension too large".into()))?;
        // Each rank's byte count and its size along `dim`.
        let mut both = vec![0 as c_int; 2 * self.size];
        let pair = [my_size, my_dim];
        self.collective("all_gather (sizes)", Wait::Collective, |api, comm, req| {
            // SAFETY: 2 ints sent, 2 per rank received into `both`.
            unsafe { (api.iallgather)(pair.as_ptr().cast(), 2, api.int, both.as_mut_ptr().cast(), 2, api.int, comm, req) }
        })?;
        for (s, p) in sizes.iter_mut().zip(both.chunks(2)) {
            *s = p[0];
        }
        let mut displs = Vec::with_capacity(self.size);
        let mut total = 0usize;
        for s in &sizes {
            displs.push(Self::count(total, "all_gather")?);
            total += *s as usize;
        }
        let mut all = vec![0u8; total];
        self.collective("all_gather", Wait::Collective, |api, comm, req| {
            // SAFETY: counts and displacements describe `all`, which outlives the request.
            unsafe { (api.iallgatherv)(mine.as_ptr().cast(), my_size, api.byte, all.as_mut_ptr().cast(), sizes.as_ptr(), displs.as_ptr(), api.byte, comm, req) }
        })?;
        let wire = wire_dtype(x.dtype());
        let mut parts = Vec::with_capacity(self.size);
        for r in 0..self.size {
            let mut dims = x.dims().to_vec();
            dims[dim] = both[2 * r + 1] as usize;
            let start = displs[r] as usize;
            let bytes = &all[start..start + sizes[r] as usize];
            parts.push(Tensor::from_raw_buffer(bytes, wire, &dims, &Device::Cpu)?);
        }
        Tensor::cat(&parts, dim)?.to_dtype(x.dtype())?.to_device(x.device())
    }

    fn broadcast(&self, x: Option<&Tensor>, root: usize, wait: Wait) -> Result<Tensor> {
        if root >= self.size {
            lmx_core::bail!("broadcast from rank {root}: the group has {} ranks", self.size);
        }
        // A root that cannot send still takes part, with an empty header (code 0), so the
        // others fail at once instead of waiting.
        let mine = match (self.rank == root, x) {
            (true, Some(x)) => header(x).and_then(|h| Ok((h, to_bytes(x)?))).map(Some),
            (true, None) => Err(lmx_core::Error::Msg(format!("broadcast: the root rank {root} has no tensor to send"))),
            (false, _) => Ok(None),
        };
        let failed = mine.as_ref().err().map(|e| e.to_string());
        let (mut h, mut data) = match mine {
            Ok(Some(hd)) => hd,
            _ => ([0u64; HEADER], Vec::new()),
        };
        let (hp, hn) = header_bytes(&mut h);
        self.collective("broadcast (header)", wait, |api, comm, req| {
            // SAFETY: the header buffer outlives the request.
            unsafe { (api.ibcast)(hp, hn, api.byte, root as c_int, comm, req) }
        })?;
        if let Some(e) = failed {
            lmx_core::bail!("{e}");
        }
        if h[0] == 0 {
            lmx_core::bail!("broadcast: rank {root} failed to send its tensor");
        }
        data.resize(wire_len(&h)?, 0);
        let n = Self::count(data.len(), "broadcast")?;
        self.collective("broadcast", Wait::Collective, |api, comm, req| {
            // SAFETY: `data` holds n bytes on every rank and outlives the request.
            unsafe { (api.ibcast)(data.as_mut_ptr().cast(), n, api.byte, root as c_int, comm, req) }
        })?;
        from_header(&h, &data, x.map_or(&Device::Cpu, |x| x.device()))
    }

    fn barrier(&self, wait: Wait) -> Result<()> {
        self.collective("barrier", wait, |api, comm, req| {
            // SAFETY: a barrier on the world communicator.
            unsafe { (api.ibarrier)(comm, req) }
        })
    }

    fn capturable(&self) -> bool {
        // NCCL's sums are kernels on the device's stream; Open MPI's go through the host.
        self.nccl
    }

    #[cfg(feature = "cuda")]
    fn settle(&self, x: &Tensor) -> Result<()> {
        if !self.nccl || self.nccl_comm.get().is_none() {
            return Ok(());
        }
        let Some(mark) = lmx_core::nccl::mark(x.device())? else { return Ok(()) };
        let start = Instant::now();
        let mut next_answer = start + Duration::from_millis(50);
        // Spin first: the wait is usually the tail of the step's kernels, and the host's next
        // launches should not wait on a sleeping thread.
        let mut spins = 0u32;
        while !mark.done()? {
            spins = spins.saturating_add(1);
            if spins < 20_000 {
                std::hint::spin_loop();
                continue;
            }
            if start.elapsed() > self.timeout {
                let n = *self.lock();
                self.stuck(&format!("NCCL sum (collective #{n} or before)"), self.timeout, true);
            }
            if Instant::now() > next_answer {
                self.answer_waiting_notes();
                next_answer = Instant::now() + Duration::from_millis(50);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    fn split(&self, color: usize, key: usize) -> Result<std::sync::Arc<dyn Group>> {
        // MPI_Comm_split blocks with no deadline: first make sure every rank is here.
        self.barrier(Wait::Collective)?;
        let mut comm: Handle = std::ptr::null_mut();
        let (color, key) = (c_int::try_from(color).unwrap_or(c_int::MAX), c_int::try_from(key).unwrap_or(c_int::MAX));
        // SAFETY: every rank of this communicator calls it (all passed the barrier).
        self.call("split", |api| unsafe { (api.comm_split)(self.comm.0, color, key, &mut comm) })?;
        let mut sub = Mpi::over(Comm(comm), self.timeout);
        sub.nccl = self.nccl;
        Ok(std::sync::Arc::new(sub))
    }

    fn send(&self, x: &Tensor, dst: usize, wait: Wait) -> Result<()> {
        if dst >= self.size || dst == self.rank {
            lmx_core::bail!("send to rank {dst}: rank {} of {} cannot send there", self.rank, self.size);
        }
        let mut h = header(x)?;
        let data = to_bytes(x)?;
        let n = Self::count(data.len(), "send")?;
        let (hp, hn) = header_bytes(&mut h);
        let (mut r1, mut r2): (Handle, Handle) = (std::ptr::null_mut(), std::ptr::null_mut());
        let what = format!("send to rank {dst}");
        // SAFETY: both buffers outlive their requests (waited for below; a failure between
        // is fatal, so they are never freed while in use).
        self.call(&what, |api| unsafe { (api.isend)(hp, hn, api.byte, dst as c_int, TAG_HEADER, self.comm.0, &mut r1) })?;
        if let Err(e) = self.call(&what, |api| unsafe { (api.isend)(data.as_ptr().cast(), n, api.byte, dst as c_int, TAG_DATA, self.comm.0, &mut r2) }) {
            self.fatal(&format!("error: {e}"));
        }
        self.wait(&mut r1, &what, wait)?;
        self.wait(&mut r2, &what, wait)
    }

    fn recv(&self, src: usize, wait: Wait) -> Result<Tensor> {
        if src >= self.size || src == self.rank {
            lmx_core::bail!("recv from rank {src}: rank {} of {} cannot receive from there", self.rank, self.size);
        }
        let what = format!("recv from rank {src}");
        let mut h = [0u64; HEADER];
        let (hp, hn) = header_bytes(&mut h);
        let mut r: Handle = std::ptr::null_mut();
        // SAFETY: the header buffer outlives the request.
        self.call(&what, |api| unsafe { (api.irecv)(hp, hn, api.byte, src as c_int, TAG_HEADER, self.comm.0, &mut r) })?;
        self.wait(&mut r, &what, wait)?;
        let mut data = vec![0u8; wire_len(&h)?];
        let n = Self::count(data.len(), "recv")?;
        // SAFETY: `data` holds n bytes and outlives the request.
        self.call(&what, |api| unsafe { (api.irecv)(data.as_mut_ptr().cast(), n, api.byte, src as c_int, TAG_DATA, self.comm.0, &mut r) })?;
        self.wait(&mut r, &what, Wait::Collective)?;
        from_header(&h, &data, &Device::Cpu)
    }
}

/// The `mpirun` command that starts `np` ranks (on the hosts of an Open MPI `hostfile`, else
/// here), with the settings lmx's ranks need; append the program and its arguments.
/// Processes are not pinned to cores (each rank runs its own thread pool), more ranks than
/// cores are allowed, shared memory is copied without `ptrace` permissions (containers
/// forbid them), and root may run it (containers again).
pub fn mpirun(np: usize, hostfile: Option<&std::path::Path>) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::var_os("LMX_MPIRUN").unwrap_or_else(|| "mpirun".into()));
    cmd.arg("-np").arg(np.to_string());
    if let Some(h) = hostfile {
        cmd.arg("--hostfile").arg(h);
    }
    cmd.args(["--oversubscribe", "--bind-to", "none", "--mca", "btl_vader_single_copy_mechanism", "none"]);
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd
}

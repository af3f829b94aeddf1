//! The guest the command line migrates: the reference KVM VM, or the software guest where
//! /dev/kvm cannot run it.

use clap::{Args, ValueEnum};
use migrate_core::kvm::DirtyTracking;
use migrate_core::pages::page_hashes;
use migrate_core::protocol::{MemoryLayout, RegionDesc};
use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
use migrate_core::vm::{GuestMemory, IncomingVm, MigratableVm};
use migrate_core::vmm::{ReferenceVm, VmmConfig, kvm_usable};
use migrate_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Instant;

/// Which guest to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// The reference KVM VMM if /dev/kvm works, else the software guest.
    Auto,
    /// The reference KVM VMM (fails without a usable /dev/kvm).
    Kvm,
    /// A host thread writing guest memory through vm-memory.
    Software,
}

/// KVM dirty tracking for the reference VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Tracking {
    /// KVM_GET_DIRTY_LOG with manual protect.
    Log,
    /// The KVM dirty ring.
    Ring,
}

/// The guest's shape and behaviour; source and destination must be given the same.
#[derive(Debug, Clone, Args)]
pub struct GuestArgs {
    /// Guest kind.
    #[arg(long, value_enum, default_value_t = GuestKind::Auto)]
    pub guest: GuestKind,
    /// Guest memory in MiB (a multiple of 2).
    #[arg(long, default_value_t = 256)]
    pub mem_mib: u64,
    /// vCPUs of the reference VMM (each keeps a host core busy: on 2 cores, more than one
    /// starves the migration threads).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory the guest keeps rewriting, MiB over all vCPUs.
    #[arg(long, default_value_t = 32)]
    pub working_set_mib: u64,
    /// Target dirty rate in MiB/s (0: as fast as the guest can).
    #[arg(long, default_value_t = 100)]
    pub dirty_rate_mib_s: u32,
    /// KVM dirty tracking.
    #[arg(long, value_enum, default_value_t = Tracking::Log)]
    pub tracking: Tracking,
}

impl GuestArgs {
    fn resolved_kind(&self) -> Result<GuestKind> {
        match self.guest {
            GuestKind::Auto => Ok(match kvm_usable() {
                Ok(()) => GuestKind::Kvm,
                Err(_) => GuestKind::Software,
            }),
            GuestKind::Kvm => kvm_usable()
                .map(|()| GuestKind::Kvm)
                .map_err(|why| Error::VmControl(format!("--guest kvm: {why}"))),
            GuestKind::Software => Ok(GuestKind::Software),
        }
    }

    fn vmm_config(&self) -> VmmConfig {
        let pages = (self.working_set_mib << 20) / 4096 / u64::from(self.vcpus.max(1));
        VmmConfig {
            mem_size: self.mem_mib << 20,
            vcpus: self.vcpus,
            working_set_pages: pages.max(1),
            dirty_rate_mib_s: (self.dirty_rate_mib_s > 0).then_some(self.dirty_rate_mib_s),
            tracking: match self.tracking {
                Tracking::Log => DirtyTracking::DirtyLog,
                Tracking::Ring => DirtyTracking::DirtyRing,
            },
            ..VmmConfig::default()
        }
    }

    fn software_config(&self) -> SoftwareGuestConfig {
        SoftwareGuestConfig {
            layout: MemoryLayout {
                regions: vec![RegionDesc {
                    gpa: 0,
                    len: self.mem_mib << 20,
                }],
            },
            working_set_pages: ((self.working_set_mib << 20) / 4096).max(1),
            dirty_rate_mib_s: (self.dirty_rate_mib_s > 0)
                .then_some(f64::from(self.dirty_rate_mib_s)),
            fill: false,
        }
    }
}

/// How far the guest has got, read from its own memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProgress {
    /// Passes over the working set (summed over vCPUs), or the software guest's steps.
    pub counter: u64,
    /// Pages the guest found not holding what it last wrote (must stay 0).
    pub errors: u64,
}

/// A running (or parked) guest.
#[derive(Debug)]
pub enum Guest {
    /// The reference KVM VMM.
    Kvm(ReferenceVm),
    /// The software guest.
    Software(SoftwareGuest),
}

impl Guest {
    /// Builds and starts a guest on the source.
    pub fn start(args: &GuestArgs) -> Result<Guest> {
        Ok(match args.resolved_kind()? {
            GuestKind::Software => Guest::Software(SoftwareGuest::start(args.software_config())?),
            _ => {
                let vm = ReferenceVm::new(args.vmm_config())?;
                MigratableVm::resume(&vm)?;
                Guest::Kvm(vm)
            }
        })
    }

    /// Builds a parked guest on the destination, refusing a layout other than `args`'.
    pub fn incoming(args: &GuestArgs, layout: &MemoryLayout) -> Result<Guest> {
        match args.resolved_kind()? {
            GuestKind::Software => {
                let cfg = args.software_config();
                if cfg.layout != *layout {
                    return Err(Error::Incompatible(format!(
                        "source memory {:?} differs from this guest's {:?}",
                        layout.regions, cfg.layout.regions
                    )));
                }
                Ok(Guest::Software(SoftwareGuest::incoming(cfg)?))
            }
            _ => {
                let cfg = args.vmm_config();
                cfg.check_layout(layout)?;
                Ok(Guest::Kvm(ReferenceVm::new_incoming(cfg)?))
            }
        }
    }

    /// "kvm" or "software".
    pub fn kind(&self) -> &'static str {
        match self {
            Guest::Kvm(_) => "kvm",
            Guest::Software(_) => "software",
        }
    }

    /// The guest as the migration source sees it.
    pub fn vm(&self) -> &dyn MigratableVm {
        match self {
            Guest::Kvm(vm) => vm,
            Guest::Software(g) => g,
        }
    }

    /// Progress from the guest's own memory.
    pub fn progress(&self) -> Result<GuestProgress> {
        match self {
            Guest::Kvm(vm) => {
                let mut p = GuestProgress::default();
                for i in 0..vm.config().vcpus {
                    let block = vm.status(i)?;
                    p.counter += block.counter;
                    p.errors += block.errors + u64::from(!block.checksum_consistent());
                }
                Ok(p)
            }
            // Its invariants only hold between steps, so they are checked while it is paused.
            Guest::Software(g) => Ok(GuestProgress {
                counter: g.counter(),
                errors: u64::from(!g.is_running() && g.check_consistency().is_err()),
            }),
        }
    }

    /// A digest of every page of guest memory (valid while paused).
    pub fn memory_digest(&self) -> Result<u64> {
        digest(self.vm().memory())
    }
}

/// One 64-bit digest over the per-page hashes of `mem`.
pub fn digest(mem: &GuestMemory) -> Result<u64> {
    Ok(page_hashes(mem)?
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |acc, h| {
            (acc ^ h).wrapping_mul(0x0000_0100_0000_01b3)
        }))
}

/// What the destination saw at the moment it resumed the migrated guest.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct AtResume {
    /// Digest of guest memory as received (0 when not verified).
    pub digest: u64,
    /// Guest progress as received.
    pub progress: GuestProgress,
    /// Time spent computing the digest, inside the downtime.
    pub verify_ms: f64,
}

/// The destination guest, which records [`AtResume`] when the engine resumes it.
#[derive(Debug)]
pub struct Incoming {
    /// The guest.
    pub guest: Guest,
    verify: bool,
    at_resume: Mutex<Option<AtResume>>,
}

impl Incoming {
    /// Wraps a parked guest; `verify` hashes its memory at resume.
    pub fn new(guest: Guest, verify: bool) -> Incoming {
        Incoming {
            guest,
            verify,
            at_resume: Mutex::new(None),
        }
    }

    /// What was recorded at resume, once resumed.
    pub fn at_resume(&self) -> Option<AtResume> {
        *self.at_resume.lock().expect("at_resume poisoned")
    }

    fn incoming(&self) -> &dyn IncomingVm {
        match &self.guest {
            Guest::Kvm(vm) => vm,
            Guest::Software(g) => g,
        }
    }
}

impl IncomingVm for Incoming {
    fn memory(&self) -> &GuestMemory {
        self.incoming().memory()
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        self.incoming().restore_state(state)
    }

    fn resume(&self) -> Result<()> {
        let start = Instant::now();
        let digest = if self.verify {
            digest(self.incoming().memory())?
        } else {
            0
        };
        let verify_ms = start.elapsed().as_secs_f64() * 1e3;
        let record = AtResume {
            digest,
            progress: self.guest.progress()?,
            verify_ms,
        };
        *self.at_resume.lock().expect("at_resume poisoned") = Some(record);
        self.incoming().resume()
    }
}

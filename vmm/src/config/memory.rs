//! How guest RAM is backed: 4 KiB pages, transparent huge pages, or hugetlbfs 2 MiB pages.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Size of an x86-64 huge page (a PMD mapping).
pub const HUGE_PAGE_MIB: u32 = 2;

/// Guest RAM below this offset is never advised for transparent huge pages: it holds the boot
/// structures Kiln writes (GDT, zero page, page tables, MP and ACPI tables) and the first MiB of
/// the kernel, a few KiB that would each cost a whole 2 MiB page. Everything above it is where a
/// guest's own first touches happen.
pub const THP_SKIP_BYTES: u64 = (HUGE_PAGE_MIB as u64) << 20;

/// The page size behind guest RAM (Firecracker's `huge_pages` field, same spellings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages only: the smallest footprint for guests that touch little memory.
    None,
    /// Transparent huge pages (`madvise(MADV_HUGEPAGE)`) on guest RAM above the first 2 MiB: a
    /// guest first-touching its memory takes one fault per 2 MiB instead of one per 4 KiB.
    #[default]
    Transparent,
    /// hugetlbfs 2 MiB pages, reserved up front from the host's pool (`vm.nr_hugepages`);
    /// guest memory must be a multiple of 2 MiB.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

impl HugePages {
    /// The spelling used in JSON, on the command line and by Firecracker's API.
    pub fn as_str(self) -> &'static str {
        match self {
            HugePages::None => "None",
            HugePages::Transparent => "Transparent",
            HugePages::Hugetlbfs2M => "2M",
        }
    }

    /// Checks that `memory_mib` can be backed by these pages.
    pub fn check_memory(self, memory_mib: u32) -> Result<(), ConfigError> {
        if self == HugePages::Hugetlbfs2M && !memory_mib.is_multiple_of(HUGE_PAGE_MIB) {
            return Err(ConfigError::MemoryNotHugePageMultiple(memory_mib));
        }
        Ok(())
    }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HugePages {
    type Err = ConfigError;

    /// Parses `none`, `transparent` or `2M` (any case).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "none" => Ok(HugePages::None),
            "transparent" | "thp" => Ok(HugePages::Transparent),
            "2m" => Ok(HugePages::Hugetlbfs2M),
            _ => Err(ConfigError::InvalidHugePages(text.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for pages in [
            HugePages::None,
            HugePages::Transparent,
            HugePages::Hugetlbfs2M,
        ] {
            assert_eq!(pages.as_str().parse::<HugePages>(), Ok(pages));
            let json = serde_json::to_string(&pages).unwrap();
            assert_eq!(json, format!("\"{}\"", pages.as_str()));
            assert_eq!(serde_json::from_str::<HugePages>(&json).unwrap(), pages);
        }
        assert_eq!("THP".parse::<HugePages>(), Ok(HugePages::Transparent));
        assert_eq!(
            "4K".parse::<HugePages>(),
            Err(ConfigError::InvalidHugePages("4K".into()))
        );
        assert!(serde_json::from_str::<HugePages>("\"7M\"").is_err());
    }

    #[test]
    fn hugetlbfs_needs_whole_huge_pages() {
        assert_eq!(HugePages::Hugetlbfs2M.check_memory(128), Ok(()));
        assert_eq!(
            HugePages::Hugetlbfs2M.check_memory(129),
            Err(ConfigError::MemoryNotHugePageMultiple(129))
        );
        assert_eq!(HugePages::Transparent.check_memory(129), Ok(()));
        assert_eq!(HugePages::None.check_memory(129), Ok(()));
    }
}

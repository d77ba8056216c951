//! The libtest-style command line of a `harness = false` test binary: name filters, `--skip`,
//! `--exact`, `--list`; other libtest flags are accepted and ignored.

/// libtest flags that take a value (as the next argument or after `=`).
const FLAGS_WITH_VALUE: &[&str] = &[
    "--skip",
    "--test-threads",
    "--logfile",
    "--format",
    "--color",
    "--shuffle-seed",
    "-Z",
];

/// Which tests to run, from the command line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selection {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    /// `--list`: print the test names instead of running them.
    pub list: bool,
    /// `--ignored`: run only ignored tests (these suites have none).
    pub ignored_only: bool,
    /// Arguments that were not understood (reported, not fatal).
    pub unknown: Vec<String>,
}

impl Selection {
    /// Parses arguments (without the program name).
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Self {
        let mut selection = Self::default();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (flag, inline_value) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with('-') => (flag.to_string(), Some(value)),
                _ => (arg.clone(), None),
            };
            if FLAGS_WITH_VALUE.contains(&flag.as_str()) {
                let value = inline_value.map(str::to_string).or_else(|| args.next());
                if flag == "--skip" {
                    selection.skips.extend(value);
                }
                continue;
            }
            match flag.as_str() {
                "--exact" => selection.exact = true,
                "--list" => selection.list = true,
                "--ignored" => selection.ignored_only = true,
                "--include-ignored" | "--nocapture" | "--show-output" | "--quiet" | "-q"
                | "--test" | "--bench" | "--report-time" | "--shuffle" | "--no-capture" => {}
                _ if arg.starts_with('-') => selection.unknown.push(arg),
                _ => selection.filters.push(arg),
            }
        }
        selection
    }

    /// Whether the test called `name` runs.
    pub fn selects(&self, name: &str) -> bool {
        if self.ignored_only {
            return false;
        }
        let hit = |pattern: &String| {
            if self.exact {
                name == pattern
            } else {
                name.contains(pattern.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit)) && !self.skips.iter().any(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Selection {
        Selection::parse(args.iter().map(|arg| arg.to_string()))
    }

    #[test]
    fn no_arguments_select_everything() {
        assert!(parse(&[]).selects("anything"));
    }

    #[test]
    fn filters_are_substrings_unless_exact() {
        let selection = parse(&["vcpu"]);
        assert!(selection.selects("four_vcpus"));
        assert!(!selection.selects("cmdline"));
        let exact = parse(&["--exact", "vcpu"]);
        assert!(!exact.selects("four_vcpus"));
        assert!(exact.selects("vcpu"));
    }

    #[test]
    fn skip_and_valued_flags() {
        let selection = parse(&[
            "--test-threads",
            "1",
            "--skip",
            "bz",
            "--color=never",
            "boot",
        ]);
        assert!(selection.selects("boot_vmlinux"));
        assert!(!selection.selects("boot_bzimage"));
        assert!(selection.unknown.is_empty());
    }

    #[test]
    fn list_and_unknown_flags() {
        let selection = parse(&["--list", "--frobnicate"]);
        assert!(selection.list);
        assert_eq!(selection.unknown, ["--frobnicate"]);
    }
}

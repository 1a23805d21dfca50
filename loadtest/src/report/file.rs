//! Writing one rendered report file, shared by the renderers so each failure names its path the
//! same way.

use crate::error::{LoadtestError, Result};
use std::path::Path;

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<String> {
    std::fs::write(path, bytes).map_err(|source| LoadtestError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(path.display().to_string())
}

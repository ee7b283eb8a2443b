//! Messages to the user: through ggml's log callback once the ggml-cpu adapter has attached
//! (so they appear in llama.cpp's log, in its style), on stderr before that.

use crate::config::Runtime;
use crate::ggml::{self, raw};

fn emit(level: raw::ggml_log_level, msg: &str) {
    let line = if msg.ends_with('\n') { msg.to_string() } else { format!("{msg}\n") };
    match ggml::api() {
        Some(api) => api.log(level as i32, &line),
        None => eprint!("{line}"),
    }
}

pub fn debug(msg: &str) {
    emit(raw::GGML_LOG_LEVEL_DEBUG, msg);
}

pub fn info(msg: &str) {
    emit(raw::GGML_LOG_LEVEL_INFO, msg);
}

pub fn warn(msg: &str) {
    emit(raw::GGML_LOG_LEVEL_WARN, msg);
}

pub fn error(msg: &str) {
    emit(raw::GGML_LOG_LEVEL_ERROR, msg);
}

/// Warns once per `key` for the life of the process.
pub fn warn_once(rt: &Runtime, key: &str, msg: &str) {
    if rt.first_time(key) {
        warn(msg);
    }
}

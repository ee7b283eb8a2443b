//! Build script: Rust views of the pinned ggml headers (bindgen) and the C header of our
//! own ABI (cbindgen).
//!
//! ggml headers come from the patched tree `make llama` prepares (third_party/llama.cpp),
//! or from LLAMA_CPP_DIR. The generated C header is compared with the committed
//! include/numa_moe.h: NUMA_MOE_UPDATE_HEADER=1 rewrites it, NUMA_MOE_HEADER_CHECK=1 makes a
//! stale header an error (what `make header-check` runs), otherwise it is a warning.

use std::env;
use std::path::{Path, PathBuf};

fn ggml_dir() -> PathBuf {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let candidates: Vec<PathBuf> = [
        env::var("NUMA_MOE_LLAMA_SRC").ok().map(PathBuf::from),
        Some(manifest.join("third_party/llama.cpp")),
        env::var("LLAMA_CPP_DIR").ok().map(PathBuf::from),
    ]
    .into_iter()
    .flatten()
    .collect();
    for c in &candidates {
        if c.join("ggml/include/ggml.h").is_file() && c.join("ggml/src/ggml-backend-impl.h").is_file() {
            return c.join("ggml");
        }
    }
    panic!(
        "\n\nnuma-moe needs the pinned llama.cpp headers (ggml.h, ggml-backend-impl.h) and found none in:\n  {}\n\
         Run `make llama` (fetches and patches llama.cpp into third_party/) or set LLAMA_CPP_DIR to a llama.cpp checkout.\n\n",
        candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join("\n  ")
    );
}

fn bindings(ggml: &Path, out: &Path) {
    let inc = ggml.join("include");
    let src = ggml.join("src");
    for h in ["ggml.h", "ggml-backend.h", "ggml-cpu.h", "gguf.h"] {
        println!("cargo:rerun-if-changed={}", inc.join(h).display());
    }
    println!("cargo:rerun-if-changed={}", src.join("ggml-backend-impl.h").display());
    let b = bindgen::Builder::default()
        .header_contents(
            "numa_moe_ggml.h",
            "#include \"ggml.h\"\n#include \"ggml-backend.h\"\n#include \"ggml-backend-impl.h\"\n#include \"ggml-cpu.h\"\n#include \"gguf.h\"\n",
        )
        .clang_arg(format!("-I{}", inc.display()))
        .clang_arg(format!("-I{}", src.display()))
        // Types and constants only: every ggml function we call arrives as a pointer from the
        // ggml-cpu adapter, so the library links to no ggml library and works under LD_PRELOAD.
        .allowlist_type("ggml_tensor")
        .allowlist_type("ggml_type")
        .allowlist_type("ggml_op")
        .allowlist_type("ggml_status")
        .allowlist_type("ggml_log_level")
        .allowlist_type("ggml_type_traits")
        .allowlist_type("ggml_type_traits_cpu")
        .allowlist_type("ggml_backend_buffer")
        .allowlist_type("ggml_backend_buffer_i")
        .allowlist_type("ggml_backend_buffer_type")
        .allowlist_type("ggml_backend_buffer_type_i")
        .allowlist_var("GGML_MAX_DIMS")
        .allowlist_var("GGML_MAX_SRC")
        .allowlist_var("GGML_BACKEND_API_VERSION")
        .allowlist_var("GGML_MAX_NAME")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(true)
        .derive_default(true)
        .generate()
        .expect("bindgen failed on the ggml headers");
    b.write_to_file(out.join("ggml_bindings.rs")).expect("write ggml bindings");
}

fn header(manifest: &Path, out: &Path) {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=include/numa_moe.h");
    println!("cargo:rerun-if-env-changed=NUMA_MOE_UPDATE_HEADER");
    println!("cargo:rerun-if-env-changed=NUMA_MOE_HEADER_CHECK");
    let config = cbindgen::Config::from_file(manifest.join("cbindgen.toml")).expect("read cbindgen.toml");
    let generated = cbindgen::Builder::new().with_crate(manifest).with_config(config).generate().expect("cbindgen failed");
    let tmp = out.join("numa_moe.h");
    generated.write_to_file(&tmp);
    let new = std::fs::read_to_string(&tmp).unwrap();
    let committed_path = manifest.join("include/numa_moe.h");
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    if new == committed {
        return;
    }
    if env::var("NUMA_MOE_UPDATE_HEADER").as_deref() == Ok("1") {
        std::fs::write(&committed_path, new).expect("write include/numa_moe.h");
    } else if env::var("NUMA_MOE_HEADER_CHECK").as_deref() == Ok("1") {
        panic!(
            "include/numa_moe.h is stale: the exported functions changed. Run `make header` and commit the result.\n\
             (the generated header is at {})",
            tmp.display()
        );
    } else {
        println!("cargo:warning=include/numa_moe.h is stale; run `make header`");
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=LLAMA_CPP_DIR");
    println!("cargo:rerun-if-env-changed=NUMA_MOE_LLAMA_SRC");
    bindings(&ggml_dir(), &out);
    header(&manifest, &out);
}

//! What the binary embeds at compile time, so that a change to it rebuilds the crate:
//! - `sqlx::migrate!` embeds ../migrations;
//! - the dashboard (src/web/assets.rs) embeds ../web and its chart library from web/node_modules,
//!   which `make setup` installs with `npm ci` from web/package-lock.json. Say so plainly when
//!   that is missing, instead of an include_bytes! error.

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    for f in [
        "node_modules/uplot/dist/uPlot.iife.min.js",
        "node_modules/uplot/dist/uPlot.min.css",
    ] {
        let path = web.join(f);
        if !path.exists() {
            panic!(
                "{} is missing: install the dashboard's npm packages with `make setup` \
                 (or `npm ci --prefix web`)",
                path.display()
            );
        }
    }
    for f in ["index.html", "app.js", "app.css", "package-lock.json"] {
        println!("cargo:rerun-if-changed=../web/{f}");
    }
}

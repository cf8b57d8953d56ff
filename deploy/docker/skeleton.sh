#!/usr/bin/env bash
# Usage: skeleton.sh SOURCE DEST
# Copies the workspace's manifests (every Cargo.toml, and Cargo.lock) from SOURCE to DEST and
# gives each package an empty target where it had a real one (src/lib.rs, src/main.rs,
# src/bin/*.rs). Building DEST compiles every dependency and none of the project's code, so the
# image build caches that slow layer until a manifest or the lock file changes: the cargo-chef
# idea in a few lines of shell. Run by the Dockerfile and, as a check, by .ci/validate-deploy.
set -euo pipefail

src="${1:?usage: skeleton.sh SOURCE DEST}"
dest="${2:?usage: skeleton.sh SOURCE DEST}"
mkdir -p "${dest}"
cp "${src}/Cargo.lock" "${dest}/Cargo.lock"

# Build output, VCS data and dependencies' sources are not the workspace's manifests.
while IFS= read -r -d '' manifest; do
    dir="$(dirname "${manifest#"${src}"/}")"
    mkdir -p "${dest}/${dir}"
    cp "${manifest}" "${dest}/${dir}/Cargo.toml"
    if [[ -f "${src}/${dir}/src/lib.rs" ]]; then
        mkdir -p "${dest}/${dir}/src"
        : >"${dest}/${dir}/src/lib.rs"
    fi
    if [[ -f "${src}/${dir}/src/main.rs" ]]; then
        mkdir -p "${dest}/${dir}/src"
        echo 'fn main() {}' >"${dest}/${dir}/src/main.rs"
    fi
    if [[ -d "${src}/${dir}/src/bin" ]]; then
        mkdir -p "${dest}/${dir}/src/bin"
        for bin in "${src}/${dir}"/src/bin/*.rs; do
            [[ -e "${bin}" ]] || continue
            echo 'fn main() {}' >"${dest}/${dir}/src/bin/$(basename "${bin}")"
        done
    fi
done < <(find "${src}" \( -name target -o -name .git -o -name node_modules \) -prune \
    -o -name Cargo.toml -type f -print0)

#!/usr/bin/env bash
# Build the stage-family Apptainer images: containers/<family>.def -> containers/<family>.sif.
#
#   containers/build.sh                 all of them (data, model, eval)
#   containers/build.sh model eval      only these
#
# Needs Apptainer (>= 1.1 for unprivileged --fakeroot builds) and network access to Docker Hub,
# PyPI and download.pytorch.org. Extra `apptainer build` options (e.g. --notest on a build host
# that cannot run the images) go in APPTAINER_BUILD_ARGS. APPTAINER_TMPDIR should point at a
# filesystem with ~20 GB free: the model and eval images hold CUDA builds of torch.
set -euo pipefail

# The definitions' %files paths are relative to the repository root, so build from there whatever
# the caller's directory.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v apptainer > /dev/null 2>&1; then
    echo "containers/build.sh: error: apptainer is not on PATH; install Apptainer >= 1.1 (https://apptainer.org/docs/admin/main/installation.html) or run this on a machine that has it (often: module load apptainer)" >&2
    exit 2
fi

families=("$@")
if [[ ${#families[@]} -eq 0 ]]; then
    families=(data model eval)
fi
# Check every name before building anything: a typo should not surface after an hour-long build.
for family in "${families[@]}"; do
    if [[ ! "${family}" =~ ^[a-z]+$ || ! -f "containers/${family}.def" ]]; then
        echo "containers/build.sh: error: no definition containers/${family}.def; name one or more of: data, model, eval" >&2
        exit 2
    fi
done

build_args=()
# Unprivileged users build through a user namespace; root needs (and may not use) no --fakeroot.
if [[ "$(id -u)" -ne 0 ]]; then
    build_args+=(--fakeroot)
fi
if [[ -n "${APPTAINER_BUILD_ARGS:-}" ]]; then
    read -r -a extra <<< "${APPTAINER_BUILD_ARGS}"
    build_args+=("${extra[@]}")
fi

for family in "${families[@]}"; do
    image="containers/${family}.sif"
    # Build next to the target and move it into place only when the build (and its %test) passed:
    # a failed build leaves the previous image, which running jobs may still be using, intact.
    partial="containers/${family}.partial.sif"
    rm -f "${partial}"
    echo "containers/build.sh: building ${image} from containers/${family}.def"
    if ! apptainer build ${build_args[@]+"${build_args[@]}"} "${partial}" "containers/${family}.def"; then
        rm -f "${partial}"
        echo "containers/build.sh: error: building ${image} failed (see the output above); the previous image, if any, is unchanged" >&2
        exit 1
    fi
    mv -f "${partial}" "${image}"
    echo "containers/build.sh: wrote ${image}"
done

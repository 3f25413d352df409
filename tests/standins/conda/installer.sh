#!/bin/sh
# STAND-IN for a Miniconda / Miniforge installer (tests only): the command line of
# conda/constructor's header.sh (-b -p PREFIX [-u|-f]), without the payload of packages.
#
# Tests build the installer file as this header followed by the stand-in `conda` script
# (tests/standins/conda/conda) after the __STANDIN_PAYLOAD__ line, like a real installer carries
# its payload after the header. Name the file Miniforge3-* for the Miniforge flavor (conda-forge,
# no ToS plugin); any other name installs the Miniconda flavor (defaults channels). The conda
# version comes from the name as in Anaconda's (Miniconda3-py310_25.5.1-1-Linux-x86_64.sh:
# 25.5.1), else 24.9.2, ddpfleet's pin. Like the real ones, a Miniconda with conda >= 24.11
# carries the conda-anaconda-tos plugin (recorded as conda-meta/conda-anaconda-tos-*.json, where
# conda records every package it holds); 24.9.2 has none.
# Every run is appended to $DDPFLEET_STANDIN_LOG (default /var/log/ddpfleet-standin-conda.log).
set -eu
LOG=${DDPFLEET_STANDIN_LOG:-/var/log/ddpfleet-standin-conda.log}
PREFIX="${HOME:-/opt}/miniconda3"
BATCH=0
FORCE=0
usage() {
    echo "usage: $0 [options]"
    echo "-b  run install in batch mode (without manual intervention)"
    echo "-f  no error if install prefix already exists"
    echo "-h  print this help message and exit"
    echo "-p PREFIX  install prefix, defaults to $PREFIX"
    echo "-u  update an existing installation"
}
while getopts "bfhkp:stu" x; do
    case "$x" in
        h) usage; exit 2 ;;
        b) BATCH=1 ;;
        f|u) FORCE=1 ;;
        p) PREFIX="$OPTARG" ;;
        k|s|t) ;;
        ?) usage; exit 2 ;;
    esac
done
printf '{"time": %s, "argv": "%s", "action": "installer", "prefix": "%s"}\n' \
    "$(date +%s)" "$*" "$PREFIX" >>"$LOG" 2>/dev/null || true
if [ "$BATCH" = 0 ]; then
    echo "stand-in installer: only batch mode (-b) is supported" >&2
    exit 2
fi
case "$PREFIX" in
    *" "*) echo "ERROR: Cannot install into directories with spaces" >&2; exit 1 ;;
esac
if [ "$FORCE" = "0" ] && [ -e "$PREFIX" ]; then
    printf "ERROR: File or directory already exists: '%s'\n" "$PREFIX" >&2
    printf "If you want to update an existing installation, use the -u option.\n" >&2
    exit 1
fi
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
echo "PREFIX=$PREFIX"
echo "Unpacking payload ..."
mkdir -p "$PREFIX/bin" "$PREFIX/conda-meta" "$PREFIX/condabin" "$PREFIX/envs" "$PREFIX/pkgs"
sed '1,/^__STANDIN_PAYLOAD__$/d' "$0" >"$PREFIX/bin/conda.tmp"
chmod 0755 "$PREFIX/bin/conda.tmp"
mv -f "$PREFIX/bin/conda.tmp" "$PREFIX/bin/conda"
ln -sf ../bin/conda "$PREFIX/condabin/conda"
VERSION=$(basename "$0" | sed -n 's/^Miniconda3-py[0-9]*_\([0-9][0-9]*\.[0-9][0-9]*\.[0-9][0-9]*\)-.*/\1/p')
VERSION=${VERSION:-24.9.2}
echo '{"name": "conda", "version": "'"$VERSION"'"}' >"$PREFIX/conda-meta/conda-$VERSION-standin_0.json"
case "$(basename "$0")" in
    Miniforge*) printf 'channels:\n  - conda-forge\n' >"$PREFIX/.condarc" ;;
    *)
        printf 'channels:\n  - defaults\n' >"$PREFIX/.condarc"
        major=${VERSION%%.*} rest=${VERSION#*.}
        minor=${rest%%.*}
        if [ "$major" -gt 24 ] || { [ "$major" -eq 24 ] && [ "$minor" -ge 11 ]; }; then
            echo '{"name": "conda-anaconda-tos", "version": "0.2.1"}' \
                >"$PREFIX/conda-meta/conda-anaconda-tos-0.2.1-standin_0.json"
        fi
        ;;
esac
echo "installation finished."
exit 0
__STANDIN_PAYLOAD__

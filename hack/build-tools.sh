#!/usr/bin/env bash
# Builds the pinned binaries of the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm), of the local node (kubelet, kube-proxy) and nats-server (JetStream) from the Go module proxy into a cache outside the repository, keyed by
# version; and, only when named, the release tools (crane, cosign, syft, actionlint: `make release-local`). Idempotent: with everything cached it only rewrites tools.env and prints, in well under a second.
#
#   hack/build-tools.sh                  build every tool (not the release tools) that is missing; the last stdout line is
#                                        `export HOOKFLEET_ETCD=… HOOKFLEET_KUBE_APISERVER=… …` (eval-able)
#   hack/build-tools.sh etcd kubectl     build only those (same output, for the named tools)
#   hack/build-tools.sh --print-dir NAME print the directory holding NAME (built first if missing)
#
# Cache: ${HOOKFLEET_CACHE:-$HOME/.cache/hookfleet}
#   bin/<name>-<version>/<name>      the binaries (written under a temporary name, checked, then renamed)
#   bin/tools.env                    HOOKFLEET_<NAME>=<absolute path> for every pinned tool present in the cache
#   src/<module>-<version>/          throwaway Go modules the binaries are built from (`.packages` lists the
#                                    main packages already resolved in it; a new one is added with `go get`)
# Module downloads and compiled packages go to Go's own caches (GOMODCACHE, GOCACHE).
#
# KUBEBUILDER_ASSETS: etcd, kube-apiserver and kubectl found there are used instead of being built (--print-dir
# prints that directory); tools.env still lists only binaries of this cache.
#
# Versions can be overridden from the environment (HOOKFLEET_KUBE_VERSION, …); Go is used as installed
# (GOTOOLCHAIN=local unless set), so no toolchain is ever downloaded.
set -euo pipefail
shopt -s inherit_errexit   # also inside $(…)

KUBE_VERSION="${HOOKFLEET_KUBE_VERSION:-v1.34.4}"   # kube-apiserver, -controller-manager, -scheduler, kubectl, kubelet, kube-proxy
ETCD_VERSION="${HOOKFLEET_ETCD_VERSION:-v3.6.16}"   # go.etcd.io/etcd/server/v3
KWOK_VERSION="${HOOKFLEET_KWOK_VERSION:-v0.8.0}"    # sigs.k8s.io/kwok (its supported_releases.txt lists 1.34)
HELM_VERSION="${HOOKFLEET_HELM_VERSION:-v3.19.5}"   # helm.sh/helm/v3 (built against k8s.io/* v0.34)
NATS_VERSION="${HOOKFLEET_NATS_SERVER_VERSION:-v2.15.3}" # github.com/nats-io/nats-server/v2 (JetStream: the NATS source's tests)
# The release tools (`make release-local`), built only when named.
GGCR_VERSION="${HOOKFLEET_GGCR_VERSION:-v0.22.1}"   # github.com/google/go-containerregistry: crane (also `crane registry serve`)
COSIGN_VERSION="${HOOKFLEET_COSIGN_VERSION:-v2.6.5}" # github.com/sigstore/cosign/v2 (v2: key-pair signing offline)
SYFT_VERSION="${HOOKFLEET_SYFT_VERSION:-v1.57.2}"   # github.com/anchore/syft
ACTIONLINT_VERSION="${HOOKFLEET_ACTIONLINT_VERSION:-v1.7.12}" # github.com/rhysd/actionlint

ROOT="${HOOKFLEET_CACHE:-${HOME:-/tmp}/.cache/hookfleet}"
TOOLS=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kubelet kube-proxy nats-server)
RELEASE_TOOLS=(crane cosign syft actionlint)
# The k8s.io/kubernetes main packages built from one throwaway module.
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)

export CGO_ENABLED=0
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOWORK=off GO111MODULE=on
export GOFLAGS="${GOFLAGS:-} -modcacherw"   # lets `rm -rf`/`go clean -modcache` remove what we downloaded

log() { printf '%(%F %T)T build-tools: %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { local t=${EPOCHREALTIME/,/.}; echo "${t%???}"; }           # seconds with milliseconds
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

usage() {
    sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

version_of() {
    case "$1" in
        etcd) echo "$ETCD_VERSION" ;;
        kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet | kube-proxy) echo "$KUBE_VERSION" ;;
        kwok) echo "$KWOK_VERSION" ;;
        helm) echo "$HELM_VERSION" ;;
        nats-server) echo "$NATS_VERSION" ;;
        crane) echo "$GGCR_VERSION" ;;
        cosign) echo "$COSIGN_VERSION" ;;
        syft) echo "$SYFT_VERSION" ;;
        actionlint) echo "$ACTIONLINT_VERSION" ;;
        *) die "unknown tool '$1' (known: ${TOOLS[*]} ${RELEASE_TOOLS[*]})" ;;
    esac
}

env_var_of() { local n="${1^^}"; echo "HOOKFLEET_${n//-/_}"; }
cached_path() { echo "$ROOT/bin/$1-$(version_of "$1")/$1"; }

# The binary of KUBEBUILDER_ASSETS to use for $1, if any.
assets_path() {
    case "$1" in etcd | kube-apiserver | kubectl) ;; *) return 1 ;; esac
    [[ -n "${KUBEBUILDER_ASSETS:-}" && -x "$KUBEBUILDER_ASSETS/$1" ]] || return 1
    echo "$KUBEBUILDER_ASSETS/$1"
}

# Where $1 is taken from: KUBEBUILDER_ASSETS, else the cache (whether or not it is there yet).
resolved_path() { assets_path "$1" || cached_path "$1"; }

# ---- building -----------------------------------------------------------------------------------------------

# Field $3 (GoMod, Info, Dir) of module $1 at version $2, downloaded into the module cache.
module_file() {
    local json
    mkdir -p "$ROOT"
    json=$(cd "$ROOT" && go mod download -json "$1@$2") ||
        die "go mod download $1@$2 failed: $(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")"
    sed -n "s/^[[:space:]]*\"$3\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" <<<"$json" | head -n1
}
module_gomod() { module_file "$1" "$2" GoMod; }

# Prepares (once) a throwaway module under $ROOT/src that requires $1@$2 and can build packages $4… of it.
# $3 is a space-separated list of extra `go mod edit` flags (replacements). The go/godebug lines of the target's
# own go.mod are copied so the binaries get the GODEBUG defaults their authors chose. Prints the directory.
# A module prepared earlier for fewer packages (a cache from before kubelet was added) gets the new ones with
# `go get` in place: each main package can need go.sum entries the others did not (kubelet needs three).
prepare_module() {
    local mod="$1" ver="$2" edits="$3"
    shift 3
    local dir="$ROOT/src/${mod//\//_}-$ver" p
    if [[ -f "$dir/.ready" ]]; then
        local missing=()
        for p in "$@"; do
            grep -qxF "$p" "$dir/.packages" 2>/dev/null || missing+=("$p")
        done
        if ((${#missing[@]} > 0)); then
            local t0
            t0=$(now)
            log "adding ${missing[*]} to the prepared module in $dir"
            (cd "$dir" && go get "${missing[@]/%/@$ver}" >&2) || die "go get ${missing[*]} (@$ver) failed in $dir"
            printf '%s\n' "${missing[@]}" >>"$dir/.packages"
            log "added in $(elapsed "$t0")"
        fi
        echo "$dir"
        return
    fi
    local t0 gomod tmp pkgs=()
    t0=$(now)
    log "preparing module $mod@$ver in $dir"
    gomod=$(module_gomod "$mod" "$ver")
    [[ -f "$gomod" ]] || die "no go.mod found for $mod@$ver"
    mkdir -p "$ROOT/src"
    tmp=$(mktemp -d "$ROOT/src/.tmp.XXXXXX")
    {
        echo "module hookfleet.local/build-tools/${mod//\//_}"
        echo
        grep -E '^(go|godebug)[[:space:]]' "$gomod" || true
    } >"$tmp/go.mod"
    # shellcheck disable=SC2086 # $edits is a list of flags
    (cd "$tmp" && go mod edit -require="$mod@$ver" $edits) || { rm -rf "$tmp"; die "go mod edit failed for $mod@$ver"; }
    for p in "$@"; do pkgs+=("$p@$ver"); done
    (cd "$tmp" && go get "${pkgs[@]}" >&2) || { rm -rf "$tmp"; die "go get ${pkgs[*]} failed"; }
    printf '%s\n' "$@" >"$tmp/.packages"
    touch "$tmp/.ready"
    rm -rf "$dir"
    mv "$tmp" "$dir"
    log "prepared $mod@$ver in $(elapsed "$t0")"
    echo "$dir"
}

# Replacements for the staging modules of k8s.io/kubernetes, read from the replace block of its own go.mod
# (`k8s.io/<x> => ./staging/src/k8s.io/<x>`), each pointed at its published v0.<minor>.<patch> release.
kube_staging_edits() {
    local gomod staging_ver="v0.${KUBE_VERSION#v1.}" edits=() m
    gomod=$(module_gomod k8s.io/kubernetes "$KUBE_VERSION")
    while read -r m; do
        edits+=("-replace=$m=$m@$staging_ver")
    done < <(sed -nE 's#^[[:space:]]*(replace[[:space:]]+)?(k8s\.io/[^[:space:]]+)[[:space:]]+=>[[:space:]]+\./staging/.*#\2#p' "$gomod")
    ((${#edits[@]} > 0)) || die "no staging replacements found in $gomod"
    echo "${edits[*]}"
}

kube_ldflags() {
    local v="$KUBE_VERSION" major minor pkg date flags=()
    major="${v#v}"; major="${major%%.*}"
    minor="${v#v*.}"; minor="${minor%%.*}"
    # The release time the module proxy records, as buildDate (reproducible, and closer than the epoch).
    date=$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$(module_file k8s.io/kubernetes "$v" Info)")
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=("-X $pkg.gitVersion=$v" "-X $pkg.gitMajor=$major" "-X $pkg.gitMinor=$minor"
            "-X $pkg.gitTreeState=clean")
        if [[ -n "$date" ]]; then flags+=("-X $pkg.buildDate=$date"); fi
    done
    echo "${flags[*]}"
}

helm_ldflags() {
    # helm's Makefile derives the Kubernetes version it assumes (default capabilities, deprecation lint) from
    # the k8s.io/client-go it is built with: v0.34.x -> 1.34.
    local gomod client_go major minor p flags=()
    gomod=$(module_gomod helm.sh/helm/v3 "$HELM_VERSION")
    client_go=$(sed -nE 's#^[[:space:]]*k8s\.io/client-go[[:space:]]+(v[0-9.]+).*#\1#p' "$gomod" | head -n1)
    [[ "$client_go" =~ ^v0\.([0-9]+)\. ]] || die "cannot read the k8s.io/client-go version of helm $HELM_VERSION"
    major=1 minor="${BASH_REMATCH[1]}"
    flags+=("-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.gitTreeState=clean")
    for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        flags+=("-X $p.k8sVersionMajor=$major" "-X $p.k8sVersionMinor=$minor")
    done
    echo "${flags[*]}"
}

# The command that checks a fresh binary, and what its output must contain.
smoke() {
    local name="$1" bin="$2" ver out
    ver=$(version_of "$name")
    case "$name" in
        kubectl) out=$("$bin" version --client 2>&1) ;;
        helm | crane | cosign | syft) out=$("$bin" version 2>&1) ;;
        actionlint) out=$("$bin" -version 2>&1) ;;
        *) out=$("$bin" --version 2>&1) ;;
    esac || die "$bin does not run: $out"
    [[ "$out" == *"${ver#v}"* ]] || die "$bin reports the wrong version (want $ver): $out"
    log "  $(head -n1 <<<"$out")"
}

build() {
    local name="$1" ver dst tmp t0 dir pkg ldflags edits
    ver=$(version_of "$name")
    dst=$(cached_path "$name")
    command -v go >/dev/null || die "Go is needed to build $name (https://go.dev/dl; Go >= 1.24)"
    t0=$(now)
    log "building $name $ver ($(go version | cut -d' ' -f3), GOTOOLCHAIN=$GOTOOLCHAIN)"
    case "$name" in
        kube-apiserver | kube-controller-manager | kube-scheduler | kubectl | kubelet | kube-proxy)
            edits=$(kube_staging_edits)
            dir=$(prepare_module k8s.io/kubernetes "$KUBE_VERSION" "$edits" "${KUBE_CMDS[@]/#/k8s.io/kubernetes/cmd/}")
            pkg="k8s.io/kubernetes/cmd/$name"
            ldflags=$(kube_ldflags) ;;
        etcd)
            # server/v3's go.mod replaces its sibling modules with local paths; a dependency's replacements are
            # ignored, and its requirements name the matching published releases.
            dir=$(prepare_module go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "" go.etcd.io/etcd/server/v3)
            pkg=go.etcd.io/etcd/server/v3
            ldflags="" ;;
        kwok)
            dir=$(prepare_module sigs.k8s.io/kwok "$KWOK_VERSION" "" sigs.k8s.io/kwok/cmd/kwok)
            pkg=sigs.k8s.io/kwok/cmd/kwok
            ldflags="-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION" ;;
        helm)
            dir=$(prepare_module helm.sh/helm/v3 "$HELM_VERSION" "" helm.sh/helm/v3/cmd/helm)
            pkg=helm.sh/helm/v3/cmd/helm
            ldflags=$(helm_ldflags) ;;
        nats-server)
            dir=$(prepare_module github.com/nats-io/nats-server/v2 "$NATS_VERSION" "" github.com/nats-io/nats-server/v2)
            pkg=github.com/nats-io/nats-server/v2
            ldflags="" ;;
        crane)
            dir=$(prepare_module github.com/google/go-containerregistry "$GGCR_VERSION" "" \
                github.com/google/go-containerregistry/cmd/crane)
            pkg=github.com/google/go-containerregistry/cmd/crane
            ldflags="-X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$GGCR_VERSION" ;;
        cosign)
            dir=$(prepare_module github.com/sigstore/cosign/v2 "$COSIGN_VERSION" "" github.com/sigstore/cosign/v2/cmd/cosign)
            pkg=github.com/sigstore/cosign/v2/cmd/cosign
            ldflags="-X sigs.k8s.io/release-utils/version.gitVersion=$COSIGN_VERSION -X sigs.k8s.io/release-utils/version.gitTreeState=clean" ;;
        syft)
            dir=$(prepare_module github.com/anchore/syft "$SYFT_VERSION" "" github.com/anchore/syft/cmd/syft)
            pkg=github.com/anchore/syft/cmd/syft
            ldflags="-X main.version=${SYFT_VERSION#v}" ;;
        actionlint)
            dir=$(prepare_module github.com/rhysd/actionlint "$ACTIONLINT_VERSION" "" github.com/rhysd/actionlint/cmd/actionlint)
            pkg=github.com/rhysd/actionlint/cmd/actionlint
            ldflags="-X github.com/rhysd/actionlint.version=$ACTIONLINT_VERSION" ;;
    esac
    mkdir -p "$(dirname "$dst")"
    tmp="$dst.tmp.$$"
    trap "rm -f $(printf '%q' "$tmp")" EXIT
    (cd "$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$tmp" "$pkg") || die "go build $pkg failed"
    smoke "$name" "$tmp"
    mv -f "$tmp" "$dst"
    trap - EXIT
    log "built $name $ver in $(elapsed "$t0"): $dst ($(du -h "$dst" | cut -f1))"
}

# ---- main ---------------------------------------------------------------------------------------------------

write_env() {
    local name p tmp
    mkdir -p "$ROOT/bin"
    tmp=$(mktemp "$ROOT/bin/.tools.env.XXXXXX")
    {
        echo "# Written by hack/build-tools.sh: the pinned tools present in this cache."
        for name in "${TOOLS[@]}" "${RELEASE_TOOLS[@]}"; do
            p=$(cached_path "$name")
            if [[ -x "$p" ]]; then echo "$(env_var_of "$name")=$p"; fi
        done
    } >"$tmp"
    mv -f "$tmp" "$ROOT/bin/tools.env"
}

ensure() {
    local missing=() name p t0
    for name in "$@"; do
        if p=$(assets_path "$name"); then
            log "using $name from KUBEBUILDER_ASSETS: $p"
        elif [[ ! -x "$(cached_path "$name")" ]]; then
            missing+=("$name")
        fi
    done
    if ((${#missing[@]} > 0)); then
        t0=$(now)
        mkdir -p "$ROOT"
        # One build at a time per cache (tests may start the script concurrently); re-check after waiting.
        exec 9>"$ROOT/.lock"
        if command -v flock >/dev/null; then
            flock -n 9 || { log "waiting for another build-tools.sh run to finish"; flock 9; }
        fi
        for name in "${missing[@]}"; do
            if [[ -x "$(cached_path "$name")" ]]; then
                log "$name was built meanwhile"
            else
                log "cache $ROOT: building $name"
                build "$name"
            fi
        done
        exec 9>&-
        log "done in $(elapsed "$t0")"
    fi
    write_env
}

main() {
    local print_dir="" names=() name
    while (($#)); do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --print-dir) (($# >= 2)) || die "--print-dir needs a tool name"; print_dir="$2"; shift ;;
            -*) die "unknown option $1 (see --help)" ;;
            *) names+=("$1") ;;
        esac
        shift
    done
    if [[ -n "$print_dir" ]]; then
        ((${#names[@]} == 0)) || die "--print-dir takes exactly one tool"
        version_of "$print_dir" >/dev/null
        ensure "$print_dir"
        dirname "$(resolved_path "$print_dir")"
        return
    fi
    ((${#names[@]} > 0)) || names=("${TOOLS[@]}")
    for name in "${names[@]}"; do version_of "$name" >/dev/null; done
    ensure "${names[@]}"
    local exports=()
    for name in "${names[@]}"; do
        exports+=("$(env_var_of "$name")=$(printf '%q' "$(resolved_path "$name")")")
    done
    echo "export ${exports[*]}"
}

main "$@"

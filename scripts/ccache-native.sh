#!/bin/sh
# The compiler launcher of the native llama.cpp tree (scripts/llama.sh native):
#
#   ccache-native.sh CPU_FILE COMPILER ARGS...
#
# ccache hashes -march=native as text, so an object compiled for one CPU would be taken from the
# cache on another (a shared cache, a home on NFS) and stop there with SIGILL. A compilation with
# a native flag also hashes CPU_FILE, what the flag expands to on this CPU; the others keep the
# hash they have in the portable tree, whose objects they share.
cpu=$1
shift
for a in "$@"; do
    case $a in
        -march=native | -mcpu=native | -mtune=native)
            export CCACHE_EXTRAFILES="$cpu${CCACHE_EXTRAFILES:+:$CCACHE_EXTRAFILES}"
            break
            ;;
    esac
done
exec ccache "$@"

"""Repository rules that show Debian's system libraries to Bazel.

Nothing is downloaded: each repository symlinks the header directories (or single
headers) a package installed under /usr/include and pairs them with a build file
from third_party/.
A missing directory fails the fetch with the package that provides it, instead of
a compiler error far away.
"""

def _system_library_impl(ctx):
    for include in ctx.attr.includes:
        path = ctx.path("/usr/include/" + include)
        if not path.exists:
            fail("%s not found: install %s (tools/setup.sh does)" % (path, ctx.attr.package))
        ctx.symlink(path, include)
    ctx.symlink(ctx.attr.build_file, "BUILD.bazel")

system_library = repository_rule(
    implementation = _system_library_impl,
    attrs = {
        "includes": attr.string_list(
            mandatory = True,
            doc = "Paths under /usr/include to expose, directories or single headers, e.g. ['absl'] or ['zmq.h'].",
        ),
        "build_file": attr.label(mandatory = True, allow_single_file = True),
        "package": attr.string(mandatory = True, doc = "Debian package that provides them."),
    },
    local = True,
)

// Command etcd is a thin wrapper around etcdmain so that a pinned etcd server can be
// built with the Go module proxy alone (plain `go install` refuses etcd's replace directives).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }

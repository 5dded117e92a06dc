// Package netfail moves service IPs (VIPs) between hosts: idempotent add and remove on
// a named interface in a given network namespace, and gratuitous ARP / unsolicited
// neighbour advertisements so that peers' neighbour caches follow at once.
//
// Errors callers act on, checked with errors.Is: ErrLinkNotFound (the VIP's interface
// does not exist in the Manager's namespace), ErrNotAssigned (Announce for a VIP the
// link does not hold), ErrClosed (the Manager was closed). The package never logs.
package netfail

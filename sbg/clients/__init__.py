"""sbg's own HTTP clients for the control plane: the signing-key fetcher and
the CONNECT endpoint through an upstream proxy. (Forwarding is
`sbg.http.upstream`'s.)"""

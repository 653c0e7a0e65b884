"""nn.Modules in OpenPCDet's contract, one concept a file; they register themselves."""

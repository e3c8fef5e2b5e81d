"use strict";
document.getElementById("login-form").onsubmit = async (event) => {
  event.preventDefault();
  const error = document.getElementById("login-error");
  error.textContent = "";
  const r = await fetch("/api/login", {
    method: "POST", headers: {"Content-Type": "application/json"}, credentials: "same-origin",
    body: JSON.stringify({name: document.getElementById("name").value,
                          password: document.getElementById("password").value}),
  });
  if (!r.ok) { error.textContent = "Wrong user name or password."; return; }
  location.assign("/worklist");
};
